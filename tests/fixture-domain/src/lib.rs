//! Test fixtures: domains that fail, panic, log and cascade on request.
//!
//! - `probe`: the command `Run { id, behaviour }` does what `behaviour` says (`ok`, `panic`, `reject`,
//!   `always`, `fail:N` = fail the first N attempts of this id in this process, `sleep:MS`, `block:PATH` =
//!   wait until the file PATH exists, at most 120 s: a stuck handler a test releases; and, to test crash
//!   containment, `abort`, `segfault`, `exit:N`, `alloc` = allocate and touch memory without bound, `spin`
//!   = loop forever on the CPU; and, to test size limits, `big:BYTES` = raise `Ran`, then a `Stuffed`
//!   event of about BYTES bytes, failing with the host's error if it refuses it, and `big-quiet:BYTES` =
//!   the same, ignoring that error), and the command
//!   `Step { chain, n, depth }` starts a cascade of `depth` event → command hops.
//! - `broken`: its constructor returns an error (two handlers share a name).
//! - `panicking`: its constructor panics.
//! - `empty`: no handlers at all.
//! - `noop`: one event handler that only decodes `Ticked` events (benchmarks).
//! - `sequencing`: an ordered handler recording each key's sequence numbers ([`sequencing`]).
//! - `timers`: schedules, cancels and process-manager timeouts ([`timers`]).
//!
//! No instance is called `domain`, so naming none is ambiguous on purpose. The test builds of
//! `Cargo.toml`'s features differ: the hot-reload builds export `domain` only (module `reload`), and
//! the ABI builds link a deliberately incompatible plugin-api.

// A reload build exports `reload::domain` only, so the fixtures are unused there.
#![cfg_attr(
    any(feature = "reload-test-variant", feature = "reload-test-panic"),
    allow(dead_code)
)]

use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
};

use protean_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};

#[cfg(any(feature = "reload-test-variant", feature = "reload-test-panic"))]
pub mod reload;
pub mod sequencing;
pub mod timers;

/// The aggregate every probe message belongs to.
#[derive(Debug, Default, Aggregate)]
pub struct Probe;

/// Do what `behaviour` says.
#[derive(Debug, Serialize, Deserialize, Command)]
#[command(aggregate = Probe, target = id)]
pub struct Run {
    /// Names the attempt counter and the stream.
    pub id: String,
    /// `ok`, `panic`, `reject`, `always`, `fail:N`, `sleep:MS`, `block:PATH`.
    pub behaviour: String,
}

/// A probe ran successfully.
#[derive(Debug, Serialize, Deserialize, Event)]
#[event(aggregate = Probe)]
pub struct Ran {
    /// The probe.
    pub id: String,
    /// How many attempts it took.
    pub attempts: u32,
}

/// An event as large as a `big:BYTES` probe asks.
#[derive(Debug, Serialize, Deserialize, Event)]
#[event(aggregate = Probe)]
pub struct Stuffed {
    /// The probe.
    pub id: String,
    /// BYTES bytes of it.
    pub filler: String,
}

/// One step of a cascade.
#[derive(Debug, Serialize, Deserialize, Message)]
pub struct Step {
    /// The cascade.
    pub chain: String,
    /// This step's number.
    pub n: u32,
    /// How many steps in all.
    pub depth: u32,
}

// By hand: its target is made of two fields, more than `#[command(target = ..)]` names.
impl Command for Step {
    type Aggregate = Probe;
    fn target_id(&self) -> String {
        format!("{}-{}", self.chain, self.n)
    }
}

/// A cascade reached step `n`.
#[derive(Debug, Serialize, Deserialize, Event)]
#[event(aggregate = Probe)]
pub struct Hopped {
    /// The cascade.
    pub chain: String,
    /// The step reached.
    pub n: u32,
    /// How many steps in all.
    pub depth: u32,
}

/// A tick for benchmarks: handled by a handler that does nothing.
#[derive(Debug, Serialize, Deserialize, Event)]
#[event(aggregate = Probe)]
pub struct Ticked {
    /// Which tick.
    pub n: u64,
    /// Something to decode.
    pub label: String,
}

/// The benchmark handler: decodes the event and does nothing else.
pub fn noop(_: Ticked, _: &mut Context) -> HandlerResult {
    Ok(())
}

fn attempts() -> &'static Mutex<HashMap<String, u32>> {
    static ATTEMPTS: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
    ATTEMPTS.get_or_init(Mutex::default)
}

fn run(command: Run, ctx: &mut Context) -> HandlerResult {
    let attempt = {
        let mut counts = attempts().lock().expect("attempt counter lock");
        let count = counts.entry(command.id.clone()).or_insert(0);
        *count += 1;
        *count
    };
    log::info!(
        "probe {} attempt {attempt}: {}",
        command.id,
        command.behaviour
    );
    match command.behaviour.as_str() {
        "panic" => panic!("probe {} was told to panic", command.id),
        "reject" => {
            return Err(HandlerError::reject(format!(
                "probe {} rejected",
                command.id
            )))
        }
        "always" => {
            return Err(HandlerError::retry(format!(
                "probe {} always fails",
                command.id
            )))
        }
        sleep if sleep.starts_with("sleep:") => {
            let ms: u64 = sleep[6..].parse().map_err(HandlerError::reject)?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        block if block.starts_with("block:") => {
            let path = std::path::Path::new(&block[6..]);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            // Polled: a plugin has no way to be woken by the test, and 10 ms keeps the wait cheap.
            while !path.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        "abort" => std::process::abort(),
        "segfault" => segfault(),
        #[allow(clippy::exit)] // the crash this behaviour is for
        exit if exit.starts_with("exit:") => {
            std::process::exit(exit[5..].parse().map_err(HandlerError::reject)?)
        }
        "alloc" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                // Touched, so the pages are really taken (an untouched allocation costs nothing).
                hoard.push(vec![1u8; 16 << 20]);
            }
        }
        "spin" => loop {
            std::hint::spin_loop();
        },
        big if big.starts_with("big:") || big.starts_with("big-quiet:") => {
            let (how, bytes) = big.split_once(':').unwrap_or_default();
            let bytes: usize = bytes.parse().map_err(HandlerError::reject)?;
            // A write before the large one: a refused message must take it back.
            let id = command.id.clone();
            ctx.raise(
                &id,
                &Ran {
                    id: id.clone(),
                    attempts: attempt,
                },
            )?;
            let stuffed = ctx.raise(
                &id,
                &Stuffed {
                    id: id.clone(),
                    filler: "x".repeat(bytes),
                },
            );
            if how == "big" {
                stuffed?;
            }
            return Ok(());
        }
        fail if fail.starts_with("fail:") => {
            let failures: u32 = fail[5..].parse().map_err(HandlerError::reject)?;
            if attempt <= failures {
                return Err(HandlerError::retry(format!(
                    "probe {} failing attempt {attempt}",
                    command.id
                )));
            }
        }
        _ => {}
    }
    ctx.raise(
        &command.id.clone(),
        &Ran {
            id: command.id,
            attempts: attempt,
        },
    )
}

/// Dies of SIGSEGV, as a handler with a memory bug would.
#[allow(unsafe_code)]
fn segfault() -> ! {
    // SAFETY: none, on purpose: a write through a null pointer is the crash this behaviour is for.
    unsafe { std::ptr::null_mut::<u8>().write_volatile(1) };
    unreachable!("a write through a null pointer returned")
}

fn step(command: Step, ctx: &mut Context) -> HandlerResult {
    let id = command.target_id();
    ctx.raise(
        &id,
        &Hopped {
            chain: command.chain,
            n: command.n,
            depth: command.depth,
        },
    )
}

fn hop(event: Hopped, ctx: &mut Context) -> HandlerResult {
    if event.n + 1 < event.depth {
        ctx.send(&Step {
            chain: event.chain,
            n: event.n + 1,
            depth: event.depth,
        })?;
    }
    Ok(())
}

fn probe() -> Domain {
    Domain::new("Probe")
        .command_handler(
            CommandHandler::<Probe>::new("runner")
                .on(run)
                .on(step)
                .max_retries(3),
        )
        .event_handler(EventHandler::new("chain").on(hop))
}

/// The probe's command handler ordered by stream: each command (a stream of its own) is a key.
fn probe_ordered() -> Domain {
    Domain::new("Probe").command_handler(
        CommandHandler::<Probe>::new("runner")
            .on(run)
            .on(step)
            .max_retries(3)
            .ordered(),
    )
}

fn bench() -> Domain {
    Domain::new("Probe").event_handler(EventHandler::new("noop").on(noop))
}

/// The same no-op handler, ordered by stream (the ticks fall on 1,000 streams: 1,000 keys).
fn ordered_bench() -> Domain {
    Domain::new("Probe").event_handler(EventHandler::new("noop").on(noop).ordered())
}

fn broken() -> Domain {
    Domain::new("Broken")
        .event_handler(EventHandler::new("twice").on(hop))
        .event_handler(EventHandler::new("twice").on(hop))
}

fn panicking() -> Domain {
    panic!("the panicking fixture's constructor panics on purpose")
}

fn empty() -> Domain {
    log::info!("empty domain created");
    Domain::new("Empty")
}

#[cfg(any(feature = "reload-test-variant", feature = "reload-test-panic"))]
protean_plugin_api::export_domains! { "domain" => reload::domain }

#[cfg(not(any(feature = "reload-test-variant", feature = "reload-test-panic")))]
protean_plugin_api::export_domains! {
    "probe" => probe,
    "broken" => broken,
    "panicking" => panicking,
    "empty" => empty,
    "noop" => bench,
    "ordered_noop" => ordered_bench,
    "sequencing" => sequencing::domain,
    "probe_ordered" => probe_ordered,
    "timers" => timers::domain,
}
