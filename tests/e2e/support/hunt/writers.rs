//! Writers besides the replicas, each on a thread of its own: `protean-host send` processes, and a
//! MessageDB client appending with `write_message` as message-db-py does (taking only its category's
//! lock). Each knows the orders it committed, and whether each began with a `PlaceOrder` command.

use std::{path::Path, thread::JoinHandle, time::Duration};

use protean_host::{message::Kind, unit_of_work::NewMessage};

use crate::support::{host, orders, place, sample_domain};

/// Orders a `send` process takes at once: small, so that sends interleave with the replicas' commits.
const CHUNK: usize = 10;

/// An order a writer committed: its id, and whether it began as a `PlaceOrder` command (else as an
/// `OrderPlaced` event another service raised).
#[derive(Debug, Clone)]
pub struct Order {
    pub id: String,
    pub commanded: bool,
}

/// A writer at work; `finish` waits for it and returns the orders it committed.
pub struct Writer(JoinHandle<Vec<Order>>);

impl Writer {
    /// Orders `first..first + n` sent by `protean-host send` processes, a chunk each.
    pub fn send(dir: &Path, first: usize, n: usize) -> Self {
        let dir = dir.to_owned();
        Self(std::thread::spawn(move || {
            let lib = sample_domain().display().to_string();
            for start in (first..first + n).step_by(CHUNK) {
                let count = CHUNK.min(first + n - start);
                let sent = host(&dir)
                    .args(["send", "--domain", &lib, "Fulfilment.PlaceOrder.v1", "-"])
                    .output_with_stdin(&orders(start, count));
                assert_eq!(sent.code(), Some(0), "send: {}", sent.stderr());
                // Pacing, so that the writes spread over the chaos (not a wait for anything).
                std::thread::sleep(Duration::from_millis(100));
            }
            (first..first + n).map(|i| order(i, true)).collect()
        }))
    }

    /// Orders `first..first + n` appended one at a time by a MessageDB client: even ones as a
    /// `PlaceOrder` command, odd ones as an `OrderPlaced` event in the order's stream, which the process
    /// manager reads with two other categories.
    pub fn message_db(uri: String, first: usize, n: usize) -> Self {
        Self(std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&uri, postgres::NoTls).unwrap();
            for i in first..first + n {
                let (kind, stream, message_type) = match i % 2 {
                    0 => (
                        Kind::Command,
                        format!("fulfilment::order:command-o{i}"),
                        "Fulfilment.PlaceOrder.v1",
                    ),
                    _ => (
                        Kind::Event,
                        format!("fulfilment::order-o{i}"),
                        "Fulfilment.OrderPlaced.v1",
                    ),
                };
                let message =
                    NewMessage::new(kind, &stream, message_type, &place(i), None, None, None);
                client
                    .execute(
                        "SELECT message_store.write_message($1, $2, $3, ($4::text)::jsonb, ($5::text)::jsonb)",
                        &[&message.id, &stream, &message.message_type, &message.data, &message.metadata],
                    )
                    .unwrap();
                std::thread::sleep(Duration::from_millis(15));
            }
            (first..first + n).map(|i| order(i, i % 2 == 0)).collect()
        }))
    }

    pub fn finish(self) -> Vec<Order> {
        self.0.join().expect("a writer failed")
    }
}

fn order(i: usize, commanded: bool) -> Order {
    Order {
        id: format!("o{i}"),
        commanded,
    }
}
