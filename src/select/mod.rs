//! ETS `select` over JSON: match specifications (`spec`), their evaluation
//! against one object (`eval`), and the scan that runs them over a table
//! within a budget (`run`).

mod eval;
mod members;
mod run;
mod spec;

pub use eval::{compare, Object};
pub use run::{select, SelectMode, Selected, Walk, ENVELOPE_BYTES};
pub use spec::{MatchSpec, SpecError};
