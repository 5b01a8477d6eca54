//! larder: Erlang ETS/DETS-style tables over HTTP/JSON.
//!
//! # Layers
//! Each layer calls only the layers below it (`docs/architecture.md` draws
//! them):
//!
//! ```text
//! app                     wiring, start-up, the shutdown order
//!  └─ api                 HTTP: routes, the front middleware, auth,
//!      │                  extractors; ApiError, the only HTTP error
//!      ├─ select          match specifications, run over any TableOps
//!      └─ tables          the storage tier: the Tables registry (catalog,
//!          │              handles, idempotency records, watch start,
//!          │              readiness), LocalTable; background tasks
//!          ├─ cluster     cluster tables in PostgreSQL, with a hot copy
//!          ├─ persist     sled write-back, group commit, recovery
//!          └─ ops         TableOps, the contract every tier implements;
//!              │          OpError
//!              └─ store   the four ETS table types in memory; the rules
//!                         of each type (store::rules), used by both tiers
//! ```
//!
//! The store never calls the durable tier: it marks what changed, and
//! [`persist`] comes to read it. Nothing below [`api`] knows HTTP; nothing
//! outside [`persist`] names sled, nothing outside [`cluster`] names
//! PostgreSQL, and the API never asks which tier a table lives in.
//!
//! - [`config`]: the command line and environment, one documented struct.
//! - [`app`]: opens the data directory, binds the listener, wires state and
//!   router, recovers, runs until a stop signal and shuts down in order.
//! - [`api`]: one module per resource (tables, entries, counters, select,
//!   transfer, watch, service, metrics); [`api::front`], the one middleware
//!   (request id, readiness, load shedding, timeout, authentication,
//!   metrics, logs); [`api::scope`], what a handler knows of its request;
//!   [`api::drain`]; per-table access ([`api::auth`]); bearer tokens and
//!   their reload ([`api::tokens`]); rate limits ([`api::rate`]); the admin
//!   listener's routes ([`api::admin`]); the read-through
//!   miss path ([`api::origin`]); idempotent retries
//!   ([`api::idempotency`]); and [`api::error::ApiError`], the only type
//!   that becomes an error response (every lower error maps to it in one
//!   place).
//! - [`tables`]: the storage tier between the API and the tiers.
//! - [`ops`]: [`ops::TableOps`] and [`ops::OpError`].
//! - [`select`]: ETS match specifications as JSON, evaluated over pages.
//! - [`cluster`]: tables kept in PostgreSQL and shared by every node.
//! - [`store`]: tables of the four ETS types with their exact semantics, the
//!   catalog of tables, TTL sweeping, LRU eviction, memory accounting and
//!   dirty tracking; knows nothing of HTTP or disk.
//! - [`persist`]: the durable tier (sled behind a trait, with real fsyncs),
//!   write-back and group commit, recovery, and the versioned on-disk format.
//! - [`tasks`]: the one supervisor of background tasks.
//! - [`clock`]: time behind a trait so expiry is testable without sleeping.
//! - [`histogram`]: fixed-bucket latency histograms for the metrics.
//! - [`json`]: JSON text as larder accepts it from clients (no repeated
//!   member names).
//! - [`net`]: the listener and its connections: the accept loop, the
//!   connection cap, header and idle timeouts, the 64 KiB head limit, and
//!   connections that close when a client stops taking the bytes of its
//!   response.
//! - [`stripe`]: per-thread copies of values every request updates.
//! - [`pace`]: the rhythm of long work: yield every few milliseconds,
//!   stop before the deadline.

#![warn(missing_docs)]

/// A named point where a test can pause or fail this code (tikv's `fail`
/// crate). Compiled to nothing unless the `failpoints` feature is on, which
/// only the tests turn on.
#[macro_export]
#[doc(hidden)]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name);
    };
}

pub mod api;
pub mod app;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod histogram;
pub mod json;
pub mod net;
pub mod ops;
pub mod pace;
pub mod persist;
pub mod procfs;
pub mod select;
pub mod store;
pub mod stripe;
pub mod tables;
pub mod tasks;
