//! Builds that take down the process loading them, one per cargo feature (the tests build each into
//! a file of its own). Each exports one instance, `domain`, so that it can replace a running build of
//! the sample domain under `--reload`:
//!
//! - no feature: `domain` is a valid, empty domain;
//! - `abort-on-load`: an ELF initialiser aborts when the library is mapped, before any host code could
//!   look at it;
//! - `abort-in-constructor`: the constructor of `domain` aborts (no unwinding, so no `catch_unwind`);
//! - `hang-in-constructor`: the constructor of `domain` never returns. When `BAD_DOMAIN_PID_FILE` is
//!   set, it first writes the pid of the process it hangs, so a test can see that process killed.

use protean_plugin_api::prelude::*;

#[cfg(all(feature = "abort-in-constructor", feature = "hang-in-constructor"))]
compile_error!("choose one constructor behaviour");

#[cfg(not(any(feature = "abort-in-constructor", feature = "hang-in-constructor")))]
fn domain() -> Domain {
    Domain::new("Bad")
}

#[cfg(feature = "abort-in-constructor")]
fn domain() -> Domain {
    std::process::abort()
}

#[cfg(feature = "hang-in-constructor")]
fn domain() -> Domain {
    if let Some(path) = std::env::var_os("BAD_DOMAIN_PID_FILE") {
        std::fs::write(path, std::process::id().to_string()).expect("write the pid file");
    }
    loop {
        // Parked, not spinning: a hang that costs no CPU (a wake-up without an unpark parks again).
        std::thread::park();
    }
}

#[cfg(feature = "abort-on-load")]
mod on_load {
    extern "C" fn abort() {
        std::process::abort()
    }

    /// The dynamic loader calls every entry of `.init_array` while it maps the library.
    #[allow(
        unsafe_code,
        reason = "placing a function in .init_array is what this feature is for"
    )]
    #[used]
    #[link_section = ".init_array"]
    static ABORT_ON_LOAD: extern "C" fn() = abort;
}

protean_plugin_api::export_domains! {
    "domain" => domain,
}
