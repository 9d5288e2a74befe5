//! orgledger: an event-sourced organization-management service.
//!
//! `domain` decides, this crate stores and serves: [`store`] (events, keys, slugs on
//! PostgreSQL or SQLite), [`ledger`] (the command path), [`config`] and [`cli`].

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
