//! Positions of an ordered subscription's partitions: where this replica has read each stream for a
//! partition, what the broker stores, and what to store next.
//!
//! Invariant: a stored position never passes an entry of its partition that is neither settled nor
//! held behind its parked key: with such an entry pending it stops just before the first one; without,
//! it is the last entry read for the partition. Entries past it are read again by the next holder and
//! skipped by their processed markers.

use std::collections::{BTreeMap, HashMap};

use crate::broker::{
    partitions::{id_before, id_key, Claim},
    Entry,
};

/// A partition this replica holds.
pub(super) struct Part {
    pub(super) claim: Claim,
    /// Per stream: the last entry id read for this partition (what the next read starts after).
    pub(super) read: HashMap<String, String>,
    /// Per stream: the position stored for this partition.
    pub(super) stored: HashMap<String, String>,
}

/// Positions to store: per partition (with its claim), the streams whose position changed and where to.
pub(super) type Positions = Vec<(Claim, Vec<(String, String)>)>;

/// Where a read of `stream` starts: after the lowest read mark among the held partitions.
pub(super) fn cursor(parts: &BTreeMap<u32, Part>, stream: &str) -> String {
    parts
        .values()
        .map(|p| p.read.get(stream).map_or("0-0", String::as_str))
        .min_by_key(|id| id_key(id))
        .unwrap_or("0-0")
        .to_owned()
}

/// Whether `entry` belongs to a partition held here and was not read for it before (a read after
/// taking a partition starts further back); marks it read.
pub(super) fn first_read(parts: &mut BTreeMap<u32, Part>, partition: u32, entry: &Entry) -> bool {
    let Some(part) = parts.get_mut(&partition) else {
        return false;
    };
    let seen = part.read.get(&entry.stream);
    if seen.is_some_and(|r| id_key(&entry.id) <= id_key(r)) {
        return false;
    }
    part.read.insert(entry.stream.clone(), entry.id.clone());
    true
}

/// Every held partition has read up to `advance` (per stream, the last entry taken in): the entries of
/// other partitions up to there are theirs.
pub(super) fn advance(parts: &mut BTreeMap<u32, Part>, advance: &HashMap<String, String>) {
    for part in parts.values_mut() {
        for (stream, id) in advance {
            if part.read.get(stream).is_none_or(|r| id_key(r) < id_key(id)) {
                part.read.insert(stream.clone(), id.clone());
            }
        }
    }
}

/// The positions that changed: per held partition and stream, after the last entry read, or just
/// before its first `unsettled` entry (partition and entry, read from a stream).
pub(super) fn updates<'a>(
    parts: &BTreeMap<u32, Part>,
    streams: &[String],
    unsettled: impl IntoIterator<Item = (u32, &'a Entry)>,
) -> Positions {
    let mut first_unsettled: HashMap<(u32, &str), &str> = HashMap::new();
    for (partition, entry) in unsettled {
        first_unsettled
            .entry((partition, entry.stream.as_str()))
            .and_modify(|id| {
                if id_key(&entry.id) < id_key(id) {
                    *id = &entry.id
                }
            })
            .or_insert(&entry.id);
    }
    let mut updates = Vec::new();
    for (partition, part) in parts {
        let mut changed = Vec::new();
        for stream in streams {
            let mark = match first_unsettled.get(&(*partition, stream.as_str())) {
                Some(id) => id_before(id),
                None => match part.read.get(stream) {
                    Some(id) => id.clone(),
                    None => continue,
                },
            };
            if part.stored.get(stream) != Some(&mark) {
                changed.push((stream.clone(), mark));
            }
        }
        if !changed.is_empty() {
            updates.push((part.claim, changed));
        }
    }
    updates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(stream: &str, id: &str) -> Entry {
        Entry {
            stream: stream.into(),
            id: id.into(),
            data: None,
            deliveries: 1,
        }
    }

    fn part(partition: u32, read: &[(&str, &str)], stored: &[(&str, &str)]) -> (u32, Part) {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(s, id)| (s.to_string(), id.to_string()))
                .collect()
        };
        let claim = Claim {
            partition,
            token: 1,
        };
        (
            partition,
            Part {
                claim,
                read: map(read),
                stored: map(stored),
            },
        )
    }

    fn streams() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    #[test]
    fn a_position_stops_just_before_the_first_unsettled_entry_of_its_partition() {
        let parts = BTreeMap::from([part(0, &[("a", "9-0")], &[])]);
        let (late, early, theirs) = (entry("a", "7-0"), entry("a", "5-3"), entry("a", "2-0"));
        let unsettled = [(0, &late), (0, &early), (1, &theirs)];
        let updates = updates(&parts, &streams(), unsettled);
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].1, [("a".to_owned(), "5-2".to_owned())]);
    }

    #[test]
    fn with_nothing_unsettled_a_position_is_the_last_entry_read_and_is_sent_only_when_it_changed() {
        let parts = BTreeMap::from([
            part(0, &[("a", "9-0"), ("b", "4-0")], &[("b", "4-0")]),
            part(1, &[("a", "3-0")], &[("a", "3-0")]),
        ]);
        let updates = updates(&parts, &streams(), []);
        assert_eq!(updates.len(), 1, "partition 1 stored its position already");
        assert_eq!(updates[0].0.partition, 0);
        assert_eq!(updates[0].1, [("a".to_owned(), "9-0".to_owned())]);
    }

    #[test]
    fn an_entry_is_taken_in_once_per_held_partition_and_reads_start_at_the_lowest_mark() {
        let mut parts = BTreeMap::from([part(0, &[("a", "5-0")], &[]), part(1, &[], &[])]);
        assert!(
            !first_read(&mut parts, 0, &entry("a", "5-0")),
            "read before"
        );
        assert!(first_read(&mut parts, 0, &entry("a", "6-0")));
        assert!(!first_read(&mut parts, 0, &entry("a", "6-0")), "now read");
        assert!(!first_read(&mut parts, 2, &entry("a", "7-0")), "not held");
        assert_eq!(cursor(&parts, "a"), "0-0", "partition 1 read nothing yet");
        advance(
            &mut parts,
            &HashMap::from([("a".to_owned(), "6-0".to_owned())]),
        );
        assert_eq!(cursor(&parts, "a"), "6-0");
        assert_eq!(cursor(&parts, "b"), "0-0");
    }
}
