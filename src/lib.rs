//! larder: Erlang ETS/DETS-style tables over HTTP/JSON.
//!
//! # Layout
//! Requests flow one way: HTTP → [`api`] → [`store`] → [`persist`].
//!
//! - [`config`]: the command line and environment, one documented struct.
//! - [`app`]: binds the listener, wires state and router, runs until a stop
//!   signal and shuts down in order.
//! - [`api`]: one module per resource (tables, entries, counters, service,
//!   metrics); authentication and per-table access ([`api::auth`]), the
//!   read-through miss path ([`api::origin`]), extractors that give every
//!   malformed request the same JSON error, and the OpenAPI document.
//!   Handlers validate, call the store, and shape responses.
//!   [`error::ApiError`] is the only type that becomes an error response.
//! - [`store`]: tables of the four ETS types with their exact semantics, TTL
//!   sweeping, LRU eviction, memory accounting and dirty tracking; knows
//!   nothing of HTTP or disk.
//! - [`persist`]: the durable tier (sled behind a trait), write-back and
//!   group commit, recovery, and the versioned on-disk format.
//! - [`clock`]: time behind a trait so expiry is testable without sleeping.
//! - [`histogram`]: fixed-bucket latency histograms for the metrics.

pub mod api;
pub mod app;
pub mod clock;
pub mod config;
pub mod error;
pub mod histogram;
pub mod persist;
pub mod store;
