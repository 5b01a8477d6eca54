//! A select over a table: scan pages in the table's order, run the
//! specification on each object outside any lock, and stop at the result
//! limit or the scan budget with a cursor that resumes right after the last
//! object examined. Built on [`TableOps::scan`], so it works alike on local
//! and cluster tables and shares the cursor contract of scans.

use super::eval::{Object, Yielded};
use super::spec::MatchSpec;
use crate::ops::{OpError, OpResult};
use crate::ops::{ReadFrom, TableOps};
use crate::pace::Pace;
use crate::store::{Cursor, Objects, ScanRequest, TableType};

/// Objects one scan page of a select examines at most.
const PAGE: usize = 1000;

/// What a select does with the objects that match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectMode {
    /// `select/3`: returns up to `limit` results.
    Results {
        /// Most results in one answer.
        limit: usize,
    },
    /// `select_count/2`.
    Count,
    /// `select_delete/2`: deletes each matching object.
    Delete,
}

/// What a select found.
#[derive(Debug, Default)]
pub struct Selected {
    /// The results (`SelectMode::Results`) as JSON texts joined by
    /// commas: one buffer for the page, not one per result.
    pub results: Vec<u8>,
    /// Results found, or objects counted or deleted.
    pub count: u64,
    /// Where to resume, or `None` when the select is complete.
    pub next_cursor: Option<Cursor>,
}

/// Most bytes reserved for a page's results ahead of them.
const RESERVE_BYTES: usize = 1 << 20;

/// Room kept in a page's byte limit for the envelope around its results
/// (`{"results":[`, `],"next_cursor":…}` with a cursor of a 1 KiB key).
pub const ENVELOPE_BYTES: usize = 2200;

/// Objects examined between two looks at the clock.
const STEP: usize = 256;

/// What adding one object's result did.
enum Pushed {
    /// It does not match.
    No,
    /// Its result was added.
    Added,
    /// Its result does not fit in what is left of the page.
    Full,
}

impl Selected {
    /// Adds what `object` yields under `spec`, if it matches and its result
    /// fits in `limit` bytes of results. After the first result, room for
    /// `expected` more of its size is reserved (up to [`RESERVE_BYTES`]),
    /// so the buffer is not grown and copied again and again, and the
    /// response can be built in it.
    fn push_result(
        &mut self,
        spec: &MatchSpec,
        object: &Object<'_>,
        expected: usize,
        limit: usize,
    ) -> Pushed {
        let mark = self.results.len();
        if mark > 0 {
            self.results.push(b',');
        }
        match spec.run(object, &mut self.results, limit) {
            Yielded::Result => {}
            Yielded::NoMatch => {
                self.results.truncate(mark);
                return Pushed::No;
            }
            Yielded::TooLarge => {
                self.results.truncate(mark);
                return Pushed::Full;
            }
        }
        self.count += 1;
        if self.count == 1 {
            // A quarter over, since later results may be longer, and room
            // for the response's envelope around them.
            let each = self.results.len() + 1;
            let room = each.saturating_mul(expected) / 4 * 5 + 96;
            self.results.reserve(room.min(RESERVE_BYTES).min(limit));
        }
        Pushed::Added
    }
}

/// The request as a select runs it.
#[derive(Debug, Clone)]
pub struct Walk {
    /// What to do with matches.
    pub mode: SelectMode,
    /// The key bounds (`range`), direction and cursor, as a scan takes
    /// them; `limit` is the select's own business.
    pub scan: ScanRequest,
    /// Most objects to examine (`--max-select-scan`).
    pub budget: usize,
    /// Most bytes of results in one page (`--max-response-bytes` less the
    /// envelope).
    pub max_bytes: usize,
    /// When to yield and when to stop.
    pub pace: Pace,
}

/// Runs `spec` over `table`. Stops at the result limit, the scan budget,
/// the byte limit or the deadline, whichever comes first, with a cursor
/// that resumes right after the last object examined; gives its worker
/// back every few milliseconds.
///
/// # Errors
/// What the table's scan, lookup or delete returns;
/// [`OpError::ResultTooLarge`] when the first result of a page alone is
/// over the byte limit.
pub async fn select(table: &impl TableOps, spec: &MatchSpec, mut walk: Walk) -> OpResult<Selected> {
    let kind = table.meta().kind();
    if let Some(key) = spec.literal_key() {
        if kind.is_single() && walk.scan.cursor.is_none() {
            return select_key(table, spec, &walk, key).await;
        }
    }
    // An ordered_set seeks its bounds; hashed tables take only the prefix
    // and filter on the rest.
    let ordered = kind == TableType::OrderedSet;
    let mut req = walk.scan.clone();
    if !ordered {
        (req.start, req.after, req.end) = (None, None, None);
    }
    let mut out = Selected::default();
    let mut examined = 0usize;
    // The first page is as long as the results wanted (a dense match needs
    // no more); pages double while matches are sparse.
    let mut page_len = match walk.mode {
        SelectMode::Results { limit } => limit.min(PAGE),
        _ => PAGE,
    };
    loop {
        req.limit = page_len.min(walk.budget.saturating_sub(examined)).max(1);
        page_len = (page_len * 2).min(PAGE);
        let page = table.scan(&req, ReadFrom::Primary).await?;
        // Where to resume if this page stops before its first object.
        let before_page = req.cursor.clone();
        let resume_before = |i: usize| {
            if i == 0 {
                before_page.clone()
            } else {
                page.cursor_after(i - 1)
            }
        };
        for (i, (key, value)) in page.items.iter().enumerate() {
            if i > 0 && i % STEP == 0 && !step(&mut walk.pace).await {
                out.next_cursor = resume_before(i);
                return Ok(out);
            }
            examined += 1;
            if !ordered && !walk.scan.admits(key) {
                continue;
            }
            let object = Object::new(key, value.as_bytes());
            match walk.mode {
                SelectMode::Results { limit } => {
                    let expected = limit.min(PAGE).saturating_sub(1);
                    match out.push_result(spec, &object, expected, walk.max_bytes) {
                        Pushed::No => continue,
                        Pushed::Added => {}
                        Pushed::Full if out.count == 0 => {
                            return Err(OpError::ResultTooLarge {
                                key: key.to_string(),
                                next_cursor: page.cursor_after(i).map(|c| c.encode()),
                                limit: walk.max_bytes,
                            });
                        }
                        Pushed::Full => {
                            out.next_cursor = resume_before(i);
                            return Ok(out);
                        }
                    }
                    if out.count >= limit as u64 {
                        let last = i + 1 == page.items.len();
                        out.next_cursor = if last && page.next_cursor.is_none() {
                            None
                        } else {
                            page.cursor_after(i)
                        };
                        return Ok(out);
                    }
                }
                SelectMode::Count => {
                    if spec.matches(&object) {
                        out.count += 1;
                    }
                }
                SelectMode::Delete => {
                    if spec.matches(&object) {
                        out.count += table.delete_object(key, value).await?;
                    }
                }
            }
        }
        match page.next_cursor {
            None => return Ok(out),
            Some(c) => req.cursor = Some(c),
        }
        if examined >= walk.budget || !step(&mut walk.pace).await {
            out.next_cursor = req.cursor;
            return Ok(out);
        }
    }
}

/// Between two steps of a walk: [`Pace::tick`], with a failpoint that
/// tests use to make steps slow.
async fn step(pace: &mut Pace) -> bool {
    crate::failpoint!("select-step");
    pace.tick().await
}

/// A select whose pattern names one key, on a set type: one lookup.
async fn select_key(
    table: &impl TableOps,
    spec: &MatchSpec,
    walk: &Walk,
    key: &str,
) -> OpResult<Selected> {
    let mut out = Selected::default();
    if !walk.scan.admits(key) {
        return Ok(out);
    }
    let Some(entry) = table.peek(key, ReadFrom::Primary).await? else {
        return Ok(out);
    };
    let Objects::One(value) = entry.objects else {
        return Ok(out);
    };
    let object = Object::new(key, value.as_bytes());
    match walk.mode {
        SelectMode::Results { .. } => {
            if let Pushed::Full = out.push_result(spec, &object, 0, walk.max_bytes) {
                return Err(OpError::ResultTooLarge {
                    key: key.to_owned(),
                    next_cursor: None,
                    limit: walk.max_bytes,
                });
            }
        }
        SelectMode::Count => out.count = u64::from(spec.matches(&object)),
        SelectMode::Delete => {
            if spec.matches(&object) {
                out.count = table.delete_object(key, &value).await?;
            }
        }
    }
    Ok(out)
}
