//! Panics stay inside the plugin: every entry point runs under [`catch`], which turns a panic into an
//! error message naming where it happened.

use std::{
    cell::{Cell, RefCell},
    panic::{self, AssertUnwindSafe},
    sync::Once,
};

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    /// How many [`catch`]es this thread is inside.
    static CATCHING: Cell<u32> = const { Cell::new(0) };
}

/// Replace this library's panic hook (each cdylib has its own std, hence its own hook) with one that
/// records the message and location for [`catch`] instead of printing to stderr. A panic outside a
/// `catch` (a failing assertion in a domain's own unit test) goes to the hook it replaced, so that
/// it is printed as usual.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CATCHING.with(Cell::get) == 0 {
                return previous(info);
            }
            let text = info.to_string().replace('\n', " ");
            LAST_PANIC.with(|last| *last.borrow_mut() = Some(text));
        }));
    });
}

/// Run `f`, turning a panic into `Err("panicked at ...: message")`.
pub(crate) fn catch<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    install_hook();
    CATCHING.with(|c| c.set(c.get() + 1));
    let caught = panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    caught.map_err(|payload| {
        LAST_PANIC
            .with(|last| last.borrow_mut().take())
            .unwrap_or_else(|| {
                payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic with a non-string payload".to_owned())
            })
    })
}
