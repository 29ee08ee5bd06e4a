//! Random faults while the replicas work: SIGKILL (then a new replica in its place), SIGSTOP for a while
//! (then SIGCONT), and broker outages. Seeded, so that a failing hunt can be repeated.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::support::{RedisServer, Server};

/// What the chaos did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub kills: usize,
    pub pauses: usize,
    pub broker_outages: usize,
}

impl Tally {
    pub fn total(&self) -> usize {
        self.kills + self.pauses + self.broker_outages
    }
}

/// Faults every hunt injects at the least, however fast its writers finish.
const MIN_FAULTS: usize = 4;

type Replicas = Arc<Mutex<Vec<(String, Server)>>>;

pub struct Chaos {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(Tally, Option<RedisServer>)>,
}

impl Chaos {
    pub fn start(seed: u64, dir: &Path, replicas: Replicas, redis: Option<RedisServer>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let monkey = Monkey {
            rng: Rng(seed),
            dir: dir.to_owned(),
            replicas,
            redis,
            tally: Tally::default(),
        };
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || monkey.run(&stop)
        });
        Self { stop, thread }
    }

    /// Stop after the fault in progress; the broker is handed back running.
    pub fn stop(self) -> (Tally, Option<RedisServer>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the chaos thread failed")
    }
}

struct Monkey {
    rng: Rng,
    dir: PathBuf,
    replicas: Replicas,
    redis: Option<RedisServer>,
    tally: Tally,
}

impl Monkey {
    fn run(mut self, stop: &AtomicBool) -> (Tally, Option<RedisServer>) {
        // A hunt whose writers finish early still gets its faults: a run without any tests nothing.
        while !stop.load(Ordering::SeqCst) || self.tally.total() < MIN_FAULTS {
            // Faults at random moments: the timing is the point, nothing is awaited.
            std::thread::sleep(self.rng.millis(150, 700));
            match self.rng.below(if self.redis.is_some() { 5 } else { 4 }) {
                0 | 1 => self.kill(),
                2 | 3 => self.pause(),
                _ => self.outage(),
            }
        }
        (self.tally, self.redis)
    }

    fn kill(&mut self) {
        let mut replicas = self.replicas.lock().unwrap();
        let i = self.rng.below(replicas.len());
        let (domain, replica) = &mut replicas[i];
        replica.signal(libc::SIGKILL);
        let fresh = super::spawn(&self.dir, domain);
        std::mem::replace(replica, fresh).wait();
        self.tally.kills += 1;
    }

    fn pause(&mut self) {
        let hold = self.rng.millis(200, 1500);
        let replicas = self.replicas.lock().unwrap();
        let replica = &replicas[self.rng.below(replicas.len())].1;
        replica.signal(libc::SIGSTOP);
        std::thread::sleep(hold);
        replica.signal(libc::SIGCONT);
        self.tally.pauses += 1;
    }

    fn outage(&mut self) {
        let hold = self.rng.millis(300, 2000);
        if let Some(redis) = &mut self.redis {
            redis.outage(hold);
            self.tally.broker_outages += 1;
        }
    }
}

/// xorshift64: enough randomness for fault timing, and repeatable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.next() % (high - low))
    }
}
