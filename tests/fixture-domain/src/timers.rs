//! The `timers` instance: schedules and process-manager timeouts, for the end-to-end tests of the
//! engine's schedules and clock.
//!
//! Domain `Timers`, aggregate `Timer` (events on `timers::timer-{id}`, commands on
//! `timers::timer:command-{id}`), one command handler `timers` and one process manager `watchdog`:
//!
//! - `Arm { id, delay_ms }` schedules the command `Ring { id }` `delay_ms` from now under the key
//!   `ring-{id}` (stored as `timers::ring-{id}`; arming again resets it) and raises
//!   `Armed { id, due_ms }`;
//! - `Disarm { id }` cancels `ring-{id}` and raises `Disarmed { id }`;
//! - `Ring { id }` raises `Rang { id, at_ms }`, `at_ms` being `ctx.now()`;
//! - `Nudge { id, at_ms }` schedules the event `Nudged { id }` itself (no command) for the time
//!   `at_ms` under the key `nudge-{id}` (stored as `timers::nudge-{id}`), and raises nothing;
//! - `Watch { id, timeout_ms }` raises `Watched`, which starts a `watchdog` instance (correlated by
//!   `id`) that sets its timeout `bark`: the command `Bark { id }` after `timeout_ms` (stored key
//!   `timers::pm::watchdog::{id}::bark`); `Feed { id }` raises `Fed`, which resets the timeout;
//!   `Release { id }` raises `Released`, which ends the instance and so cancels the timeout;
//! - `Bark { id }` raises `Barked { id, at_ms }`.

use std::time::{Duration, SystemTime};

use protean_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};

/// The aggregate every timer message belongs to.
#[derive(Debug, Default, Aggregate)]
pub struct Timer;

/// Schedule `Ring` after `delay_ms`.
#[derive(Debug, Serialize, Deserialize, Command)]
#[command(aggregate = Timer, target = id)]
pub struct Arm {
    /// The timer.
    pub id: String,
    /// How long until it rings.
    pub delay_ms: u64,
}

/// Cancel the timer's `Ring`.
#[derive(Debug, Serialize, Deserialize, Command)]
#[command(aggregate = Timer, target = id)]
pub struct Disarm {
    /// The timer.
    pub id: String,
}

/// What an armed timer sends when due.
#[derive(Debug, Serialize, Deserialize, Command)]
#[command(aggregate = Timer, target = id)]
pub struct Ring {
    /// The timer.
    pub id: String,
}

/// Schedule the event `Nudged` for `at_ms`.
#[derive(Debug, Serialize, Deserialize, Command)]
#[command(aggregate = Timer, target = id)]
pub struct Nudge {
    /// The timer.
    pub id: String,
    /// When, in ms since the Unix epoch.
    pub at_ms: u64,
}

/// Start watching: bark after `timeout_ms` unless fed or released.
#[derive(Debug, Serialize, Deserialize, Command)]
#[command(aggregate = Timer, target = id)]
pub struct Watch {
    /// The watched timer.
    pub id: String,
    /// How long the watchdog waits.
    pub timeout_ms: u64,
}

/// Reset the watchdog.
#[derive(Debug, Serialize, Deserialize, Command)]
#[command(aggregate = Timer, target = id)]
pub struct Feed {
    /// The watched timer.
    pub id: String,
}

/// Stop watching.
#[derive(Debug, Serialize, Deserialize, Command)]
#[command(aggregate = Timer, target = id)]
pub struct Release {
    /// The watched timer.
    pub id: String,
}

/// What the watchdog sends when its timeout fires.
#[derive(Debug, Serialize, Deserialize, Command)]
#[command(aggregate = Timer, target = id)]
pub struct Bark {
    /// The watched timer.
    pub id: String,
}

/// A timer was armed; it rings at `due_ms`.
#[derive(Debug, Serialize, Deserialize, Event)]
#[event(aggregate = Timer)]
pub struct Armed {
    /// The timer.
    pub id: String,
    /// When it rings, in ms since the Unix epoch.
    pub due_ms: u64,
}

/// A timer was disarmed.
#[derive(Debug, Serialize, Deserialize, Event)]
#[event(aggregate = Timer)]
pub struct Disarmed {
    /// The timer.
    pub id: String,
}

/// A timer rang.
#[derive(Debug, Serialize, Deserialize, Event)]
#[event(aggregate = Timer)]
pub struct Rang {
    /// The timer.
    pub id: String,
    /// When its `Ring` was handled (the engine's clock), in ms since the Unix epoch.
    pub at_ms: u64,
}

/// The scheduled event of `Nudge`.
#[derive(Debug, Serialize, Deserialize, Event)]
#[event(aggregate = Timer)]
pub struct Nudged {
    /// The timer.
    pub id: String,
}

/// A watch started.
#[derive(Debug, Serialize, Deserialize, Event)]
#[event(aggregate = Timer)]
pub struct Watched {
    /// The watched timer.
    pub id: String,
    /// How long the watchdog waits.
    pub timeout_ms: u64,
}

/// The watchdog was fed.
#[derive(Debug, Serialize, Deserialize, Event)]
#[event(aggregate = Timer)]
pub struct Fed {
    /// The watched timer.
    pub id: String,
}

/// The watch ended.
#[derive(Debug, Serialize, Deserialize, Event)]
#[event(aggregate = Timer)]
pub struct Released {
    /// The watched timer.
    pub id: String,
}

/// The watchdog's timeout fired.
#[derive(Debug, Serialize, Deserialize, Event)]
#[event(aggregate = Timer)]
pub struct Barked {
    /// The watched timer.
    pub id: String,
    /// When its `Bark` was handled (the engine's clock), in ms since the Unix epoch.
    pub at_ms: u64,
}

fn ms_of(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ring_key(id: &str) -> String {
    format!("ring-{id}")
}

fn arm(command: Arm, ctx: &mut Context) -> HandlerResult {
    let delay = Duration::from_millis(command.delay_ms);
    let ring = Ring {
        id: command.id.clone(),
    };
    ctx.schedule(&ring_key(&command.id))
        .after(delay)
        .send(&ring)?;
    let due_ms = ms_of(ctx.now()) + command.delay_ms;
    let id = command.id;
    ctx.raise(&id.clone(), &Armed { id, due_ms })
}

fn disarm(command: Disarm, ctx: &mut Context) -> HandlerResult {
    ctx.cancel(&ring_key(&command.id))?;
    let id = command.id;
    ctx.raise(&id.clone(), &Disarmed { id })
}

fn ring(command: Ring, ctx: &mut Context) -> HandlerResult {
    let at_ms = ms_of(ctx.now());
    let id = command.id;
    ctx.raise(&id.clone(), &Rang { id, at_ms })
}

fn nudge(command: Nudge, ctx: &mut Context) -> HandlerResult {
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(command.at_ms);
    let id = command.id;
    ctx.schedule(&format!("nudge-{id}"))
        .at(at)
        .raise(&id.clone(), &Nudged { id })
}

fn watch(command: Watch, ctx: &mut Context) -> HandlerResult {
    let id = command.id;
    let timeout_ms = command.timeout_ms;
    ctx.raise(&id.clone(), &Watched { id, timeout_ms })
}

fn feed(command: Feed, ctx: &mut Context) -> HandlerResult {
    let id = command.id;
    ctx.raise(&id.clone(), &Fed { id })
}

fn release(command: Release, ctx: &mut Context) -> HandlerResult {
    let id = command.id;
    ctx.raise(&id.clone(), &Released { id })
}

fn bark(command: Bark, ctx: &mut Context) -> HandlerResult {
    let at_ms = ms_of(ctx.now());
    let id = command.id;
    ctx.raise(&id.clone(), &Barked { id, at_ms })
}

/// The watchdog instance's state: how long it waits.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Watchdog {
    /// From `Watched`.
    pub timeout_ms: u64,
}

impl Watchdog {
    fn wait(&self, id: String, ctx: &mut Context) -> HandlerResult {
        let timeout = Duration::from_millis(self.timeout_ms);
        ctx.set_timeout("bark", timeout, &Bark { id })
    }
}

fn watched(state: &mut Watchdog, event: Watched, ctx: &mut Context) -> HandlerResult {
    state.timeout_ms = event.timeout_ms;
    state.wait(event.id, ctx)
}

fn fed(state: &mut Watchdog, event: Fed, ctx: &mut Context) -> HandlerResult {
    state.wait(event.id, ctx)
}

fn released(_: &mut Watchdog, _: Released) {}

/// The `timers` instance.
pub fn domain() -> Domain {
    Domain::new("Timers")
        .command_handler(
            CommandHandler::<Timer>::new("timers")
                .on(arm)
                .on(disarm)
                .on(ring)
                .on(nudge)
                .on(watch)
                .on(feed)
                .on(release)
                .on(bark),
        )
        .process_manager(
            ProcessManager::<Watchdog>::new("watchdog", "id")
                .start(watched)
                .on(fed)
                .end(released),
        )
}

#[cfg(test)]
mod tests {
    use protean_plugin_api::testing::TestHost;

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn command(host: &TestHost, command: &impl Command) {
        host.handle_command("timers", command).unwrap();
    }

    #[test]
    fn an_armed_timer_rings_unless_disarmed() {
        let host = TestHost::new(domain());
        let armed = |id: &str| Arm {
            id: id.into(),
            delay_ms: 1_000,
        };
        command(&host, &armed("t1"));
        command(&host, &armed("t2"));
        command(&host, &Disarm { id: "t2".into() });
        let fired = host.advance(SECOND);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].stream, "timers::timer:command-t1");
        command(&host, &Ring { id: "t1".into() });
        let events = host.events::<Timer>("t1");
        assert_eq!(events[1].data["at_ms"], ms_of(host.now()));
        assert_eq!(events[0].data["due_ms"], ms_of(host.now()));
    }

    #[test]
    fn a_nudge_is_an_event_at_its_time() {
        let host = TestHost::new(domain());
        let at_ms = ms_of(host.now()) + 5_000;
        command(
            &host,
            &Nudge {
                id: "t1".into(),
                at_ms,
            },
        );
        assert_eq!(host.scheduled()[0].key, "timers::nudge-t1");
        host.advance(5 * SECOND);
        assert_eq!(
            host.events::<Timer>("t1")[0].message_type,
            "Timers.Nudged.v1"
        );
    }

    #[test]
    fn the_watchdog_barks_when_not_fed_and_stops_when_released() {
        let host = TestHost::new(domain());
        let watched = |id: &str| Watched {
            id: id.into(),
            timeout_ms: 2_000,
        };
        host.handle_event("watchdog", "w1", &watched("w1")).unwrap();
        host.handle_event("watchdog", "w2", &watched("w2")).unwrap();
        assert_eq!(host.scheduled()[0].key, "timers::pm::watchdog::w1::bark");
        host.advance(SECOND);
        host.handle_event("watchdog", "w1", &Fed { id: "w1".into() })
            .unwrap();
        let fired = host.advance(SECOND);
        assert_eq!(fired.len(), 1, "w1 was fed: {fired:?}");
        assert_eq!(fired[0].data["id"], "w2");
        host.handle_event("watchdog", "w1", &Released { id: "w1".into() })
            .unwrap();
        assert!(host.advance(10 * SECOND).is_empty(), "w1 was released");
    }
}
