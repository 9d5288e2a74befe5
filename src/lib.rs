//! orgledger: an event-sourced organization-management service.
//!
//! `domain` decides, this crate stores and serves: [`store`] (events, keys, slugs on
//! PostgreSQL or SQLite), [`ledger`] (the command path), [`config`] and [`cli`].

/// `eprintln!` that gives up quietly when standard error is gone (the terminal closed under
/// a long command), where `eprintln!` panics: the exit code still says how it ended.
#[macro_export]
macro_rules! stderr_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod cli;
pub mod config;
pub mod exports;
pub mod history;
pub mod http;
mod lazy_queue;
pub mod ledger;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod tokens;
mod turns;
pub mod verify;
