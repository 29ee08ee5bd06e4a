//! Intake: what of a read may be taken in now. Entries of several streams are merged in store order,
//! so a key spread over categories keeps it.
//!
//! Invariant: when one stream returned a full page, no entry of another stream past that page's last
//! global position is taken (the full stream may hold earlier ones not read yet); they are read again.

use std::collections::{HashMap, HashSet};

use crate::broker::Decoded;

/// Keep what of a read, decoded, may be handled now (see [`merge_cap`]); also returns, per stream,
/// the last entry kept.
pub(super) fn take_in_order(
    decoded: Vec<Decoded>,
    count: usize,
) -> (Vec<Decoded>, HashMap<String, String>) {
    let cap = merge_cap(&decoded, count);
    let mut cut: HashSet<String> = HashSet::new();
    let mut advance: HashMap<String, String> = HashMap::new();
    let mut taken = Vec::with_capacity(decoded.len());
    for (entry, message) in decoded {
        let beyond = matches!(&message, Ok(m) if m.global_position > cap);
        // A stream's entries are in order: past the cap once, past it for the rest of the read.
        if cut.contains(&entry.stream) || beyond {
            cut.insert(entry.stream.clone());
            continue;
        }
        advance.insert(entry.stream.clone(), entry.id.clone());
        taken.push((entry, message));
    }
    (taken, advance)
}

/// When several streams are read at once and one returned a full page, entries of the others past
/// that page's last global position may have earlier messages still unread on the full stream: take
/// everything up to the lowest such position now and the rest on the next read, so a key spread over
/// several categories keeps store order.
fn merge_cap(decoded: &[Decoded], count: usize) -> u64 {
    let mut per_stream: HashMap<&str, (usize, u64)> = HashMap::new();
    for (entry, message) in decoded {
        let slot = per_stream.entry(entry.stream.as_str()).or_default();
        slot.0 += 1;
        if let Ok(m) = message {
            slot.1 = slot.1.max(m.global_position);
        }
    }
    if per_stream.len() < 2 {
        return u64::MAX;
    }
    per_stream
        .values()
        .filter(|(n, _)| *n >= count)
        .map(|(_, last)| *last)
        .min()
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{broker::Entry, store::StoredMessage};

    fn read(stream: &str, global_positions: &[u64]) -> Vec<Decoded> {
        global_positions
            .iter()
            .map(|&global_position| {
                let entry = Entry {
                    stream: stream.into(),
                    id: format!("{global_position}-0"),
                    data: None,
                    deliveries: 1,
                };
                let message = StoredMessage {
                    global_position,
                    ..StoredMessage::default()
                };
                (entry, Ok(message))
            })
            .collect()
    }

    #[test]
    fn one_stream_or_no_full_page_takes_everything() {
        assert_eq!(merge_cap(&read("a", &[1, 2, 3]), 3), u64::MAX);
        let mut both = read("a", &[1, 5]);
        both.extend(read("b", &[2, 9]));
        assert_eq!(merge_cap(&both, 3), u64::MAX);
    }

    #[test]
    fn a_full_page_caps_the_other_streams_at_its_last_position() {
        // `a` may hold more entries after 5 that come before b's 9: take b up to 5 only.
        let mut both = read("a", &[1, 3, 5]);
        both.extend(read("b", &[2, 9]));
        assert_eq!(merge_cap(&both, 3), 5);
        // Two full pages: the lower end wins.
        let mut full = read("a", &[1, 3, 5]);
        full.extend(read("b", &[2, 4, 6]));
        assert_eq!(merge_cap(&full, 3), 5);
    }
}
