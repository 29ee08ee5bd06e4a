//! Ordered handling: which key a message belongs to, which partition a key falls in, and what a key
//! does after a dead letter.
//!
//! Invariant: a key always falls in the same partition for a given partition count (the hash is ours,
//! not the standard library's, so it is the same in every build and on every replica), and every
//! message of a key gets the same key: a field that is missing falls back to the message's stream id,
//! which is stable too.

use protean_plugin_api::{AfterDeadLetter, STREAM_KEY};

use crate::{plugin::Kind, store::StoredMessage, subscription::SubscriptionPlan};

/// How an ordered subscription keys and parks its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ordering {
    key: Key,
    /// After a dead letter, the key's later messages wait (else they go on).
    pub(crate) park: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Stream,
    Field(String),
}

impl Ordering {
    /// The ordering a subscription's handler declared, if any. Process managers park by default.
    pub(crate) fn of(plan: &SubscriptionPlan) -> Option<Self> {
        let by = plan.options.ordered_by.as_deref()?;
        let key = match by {
            STREAM_KEY => Key::Stream,
            field => Key::Field(field.to_owned()),
        };
        let park = match plan.options.after_dead_letter {
            Some(policy) => policy == AfterDeadLetter::Park,
            None => plan.kind == Kind::ProcessManager,
        };
        Some(Self { key, park })
    }

    /// The key of `message`: its stream id, or the value of the field (a string as it is, any other
    /// scalar as its JSON text). A message without the field is keyed by its stream id.
    pub(crate) fn key_of(&self, message: &StoredMessage) -> String {
        let Key::Field(field) = &self.key else {
            return message.stream.clone();
        };
        field_value(&message.data, field).unwrap_or_else(|| message.stream.clone())
    }

    /// What the key is, for logs and status (`$stream` or the field's name).
    pub(crate) fn describe(&self) -> &str {
        match &self.key {
            Key::Stream => STREAM_KEY,
            Key::Field(field) => field,
        }
    }
}

fn field_value(data: &str, field: &str) -> Option<String> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(data).ok()?;
    match object.get(field)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null | serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
            None
        }
        scalar => Some(scalar.to_string()),
    }
}

/// The partition of `key` among `partitions` (FNV-1a: stable across builds and platforms).
pub(crate) fn partition_of(key: &str, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use protean_plugin_api::HandlerOptions;

    use super::*;

    fn plan(
        kind: Kind,
        ordered_by: Option<&str>,
        after: Option<AfterDeadLetter>,
    ) -> SubscriptionPlan {
        SubscriptionPlan {
            name: "s".into(),
            categories: vec!["d::c".into()],
            routes: Default::default(),
            options: HandlerOptions {
                ordered_by: ordered_by.map(str::to_owned),
                after_dead_letter: after,
                ..HandlerOptions::default()
            },
            kind,
        }
    }

    fn message(stream: &str, data: &str) -> StoredMessage {
        StoredMessage {
            global_position: 1,
            position: 0,
            stream: stream.into(),
            message_type: "D.E.v1".into(),
            id: "m".into(),
            time: String::new(),
            data: data.into(),
            metadata: "{}".into(),
            decoded: Default::default(),
        }
    }

    #[test]
    fn unordered_handlers_have_no_ordering() {
        assert_eq!(Ordering::of(&plan(Kind::EventHandler, None, None)), None);
    }

    #[test]
    fn process_managers_park_and_other_handlers_move_on_unless_they_say() {
        let pm = Ordering::of(&plan(Kind::ProcessManager, Some("order_id"), None)).unwrap();
        let handler = Ordering::of(&plan(Kind::EventHandler, Some(STREAM_KEY), None)).unwrap();
        let parking = Some(AfterDeadLetter::Park);
        let told = Ordering::of(&plan(Kind::EventHandler, Some(STREAM_KEY), parking)).unwrap();
        assert!(pm.park && !handler.park && told.park);
    }

    #[test]
    fn keys_come_from_the_stream_or_a_field_and_fall_back_to_the_stream() {
        let by_stream = Ordering::of(&plan(Kind::EventHandler, Some(STREAM_KEY), None)).unwrap();
        let by_field = Ordering::of(&plan(Kind::EventHandler, Some("order_id"), None)).unwrap();
        let m = message("d::c-1", r#"{"order_id": "o-7", "n": 3}"#);
        assert_eq!(by_stream.key_of(&m), "d::c-1");
        assert_eq!(by_field.key_of(&m), "o-7");
        let numeric = Ordering::of(&plan(Kind::EventHandler, Some("n"), None)).unwrap();
        assert_eq!(numeric.key_of(&m), "3");
        assert_eq!(by_field.key_of(&message("d::c-2", r#"{"x": 1}"#)), "d::c-2");
        assert_eq!(by_field.key_of(&message("d::c-3", "not json")), "d::c-3");
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        // Pinned: a change here would move every key to another partition on upgrade.
        assert_eq!(partition_of("d::c-1", 32), partition_of("d::c-1", 32));
        assert_eq!(partition_of("", 32), (0xcbf2_9ce4_8422_2325u64 % 32) as u32);
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[partition_of(&format!("order-{i}"), 8) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
