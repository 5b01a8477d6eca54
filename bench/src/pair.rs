//! A throughput row of larder against a baseline other than the ceiling
//! (a table of another kind, PostgreSQL itself, a scan), measured in
//! alternating rounds. The cluster, select and watch sections build these
//! rows; the report prints them.

use serde::Serialize;

use crate::wrk::Run;

/// A throughput row: larder against a baseline (not the ceiling),
/// alternating.
#[derive(Debug, Serialize)]
pub struct PairRow {
    pub name: String,
    pub baseline: &'static str,
    pub baseline_rps: Vec<f64>,
    pub larder_rps: Vec<f64>,
    pub ratio: f64,
    pub target: f64,
    pub met: bool,
    /// Non-2xx answers and socket errors seen by wrk on larder.
    pub errors: u64,
}

impl PairRow {
    pub fn new(name: &str, baseline: &'static str, target: f64) -> PairRow {
        PairRow {
            name: name.to_owned(),
            baseline,
            baseline_rps: Vec::new(),
            larder_rps: Vec::new(),
            ratio: 0.0,
            target,
            met: false,
            errors: 0,
        }
    }

    /// Runs `rounds` alternations, the baseline first, then sums up.
    /// `larder` gives wrk's run and the unit per request (1 for req/s, the
    /// keys per request for keys/s).
    pub fn alternate(
        &mut self,
        rounds: usize,
        mut baseline: impl FnMut() -> f64,
        mut larder: impl FnMut() -> (Run, f64),
    ) {
        for round in 0..rounds {
            eprintln!("{} (round {}/{rounds})…", self.name, round + 1);
            self.baseline_rps.push(baseline());
            let (run, per_request) = larder();
            self.errors += run.non_2xx + run.socket_errors;
            self.larder_rps.push(run.rps * per_request);
        }
        self.finish();
    }

    /// Computes the ratio and whether the target was met.
    pub fn finish(&mut self) {
        let sum = |v: &[f64]| v.iter().sum::<f64>();
        self.ratio = sum(&self.larder_rps) / sum(&self.baseline_rps).max(1.0);
        self.met = self.ratio >= self.target && self.errors == 0;
    }
}
