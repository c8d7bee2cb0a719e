//! `GET /api/v1/tap/{node}`: a live, rate-bounded sample of what a node emits.
//!
//! The answer streams newline-delimited JSON, one object per line:
//! `{"rows": [{…}, …]}` for sampled rows, `{"dropped": N}` (at most once a second) when
//! rows were left out, with N the total so far, and `{"end": true, "dropped": N}` when
//! the node's stream ends. `?rate=ROWS` bounds the rows shown per second (default 10,
//! at most 1000); `?pipeline=NAME` picks the pipeline when several have the node.
//!
//! A tap never slows the pipeline: it holds a few batches, and what finds it full is
//! dropped and counted, as are the rows over its rate.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::time::Instant;
use weir_engine::arrow::record_batch::RecordBatch;
use weir_engine::observe::Tap;

use super::{ApiState, error};

/// Rows shown per second when the request does not say.
const DEFAULT_RATE: u32 = 10;
/// The most rows per second a tap shows.
const MAX_RATE: u32 = 1000;
/// Batches a tap holds while its reader is busy.
const TAP_CAPACITY: usize = 4;
/// How often dropped rows are reported, at most.
const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TapParams {
    pipeline: Option<String>,
    rate: Option<u32>,
}

pub(super) async fn tap(
    State(state): State<ApiState>,
    Path(node): Path<String>,
    params: Result<Query<TapParams>, QueryRejection>,
) -> Response {
    let params = match params {
        Ok(Query(params)) => params,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!(
                    "{}; the tap takes ?rate=ROWS (1 to {MAX_RATE}) and ?pipeline=NAME",
                    rejection.body_text()
                ),
            );
        }
    };
    let rate = params.rate.unwrap_or(DEFAULT_RATE);
    if !(1..=MAX_RATE).contains(&rate) {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("rate must be between 1 and {MAX_RATE} rows per second, not {rate}"),
        );
    }
    if let Err(refusal) = super::wait_for_start(&state.startup).await {
        return refusal;
    }
    let streams = state.pipelines.streams();
    let matching: Vec<_> = streams
        .iter()
        .filter(|view| view.node() == node)
        .filter(|view| {
            params
                .pipeline
                .as_deref()
                .is_none_or(|p| view.pipeline() == p)
        })
        .collect();
    let view = match matching.as_slice() {
        [view] => *view,
        [] => {
            let mut nodes: Vec<&str> = streams.iter().map(|view| view.node()).collect();
            nodes.sort_unstable();
            nodes.dedup();
            let within = params
                .pipeline
                .as_deref()
                .map(|p| format!(" in pipeline '{p}'"))
                .unwrap_or_default();
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no source or transform '{node}'{within}; nodes with output: {} (a sink \
                     emits nothing: tap the node it reads from)",
                    if nodes.is_empty() {
                        "none".to_owned()
                    } else {
                        nodes.join(", ")
                    }
                ),
            );
        }
        several => {
            let pipelines: Vec<&str> = several.iter().map(|view| view.pipeline()).collect();
            return error(
                StatusCode::BAD_REQUEST,
                "ambiguous",
                format!(
                    "'{node}' is in pipelines {}; say which with ?pipeline=NAME",
                    pipelines.join(", ")
                ),
            );
        }
    };
    let sampler = Sampler {
        tap: view.tap(TAP_CAPACITY),
        rate: f64::from(rate),
        tokens: f64::from(rate),
        refilled: Instant::now(),
        reported: 0,
        reported_at: None,
        ended: false,
    };
    let body = Body::from_stream(futures::stream::unfold(sampler, |mut sampler| async move {
        sampler
            .next_chunk()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), sampler))
    }));
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// Turns a tap's batches into lines, within the rate.
struct Sampler {
    tap: Tap,
    /// Rows per second.
    rate: f64,
    /// Rows that may be shown now (a token bucket that holds one second's worth).
    tokens: f64,
    refilled: Instant,
    /// The dropped total last reported, and when (the first drop is reported at once).
    reported: u64,
    reported_at: Option<Instant>,
    ended: bool,
}

impl Sampler {
    /// The next lines to send, or `None` once the end has been sent.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        loop {
            let mut out = Vec::new();
            match tokio::time::timeout(DROP_REPORT_INTERVAL, self.tap.next()).await {
                Ok(Some(batch)) => self.sample(&batch, &mut out),
                Ok(None) => {
                    self.ended = true;
                    let end = serde_json::json!({"end": true, "dropped": self.tap.dropped_rows()});
                    out.extend_from_slice(end.to_string().as_bytes());
                    out.push(b'\n');
                    return Some(out.into());
                }
                Err(_) => {}
            }
            let dropped = self.tap.dropped_rows();
            let due = self
                .reported_at
                .is_none_or(|at| at.elapsed() >= DROP_REPORT_INTERVAL);
            if dropped > self.reported && due {
                self.reported = dropped;
                self.reported_at = Some(Instant::now());
                out.extend_from_slice(
                    serde_json::json!({"dropped": dropped})
                        .to_string()
                        .as_bytes(),
                );
                out.push(b'\n');
            }
            if !out.is_empty() {
                return Some(out.into());
            }
        }
    }

    /// Writes the rows of `batch` the rate allows, spread over the batch, as a
    /// `{"rows": …}` line; counts the rest.
    fn sample(&mut self, batch: &RecordBatch, out: &mut Vec<u8>) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.refilled = now;
        let rows = batch.num_rows();
        let shown = rows.min(self.tokens.floor() as usize);
        self.tokens -= shown as f64;
        if shown < rows {
            self.tap.count_dropped((rows - shown) as u64);
        }
        if shown == 0 {
            return;
        }
        let mut json = Vec::new();
        let mut writer = weir_engine::arrow::json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, weir_engine::arrow::json::writer::JsonArray>(&mut json);
        let sample = if shown == rows {
            Ok(batch.clone())
        } else {
            weir_engine::arrow::compute::take_record_batch(batch, &spread(rows, shown))
        };
        let written = sample
            .and_then(|sample| writer.write(&sample))
            .and_then(|()| writer.finish());
        drop(writer);
        match written {
            Ok(()) => {
                out.extend_from_slice(b"{\"rows\":");
                out.extend_from_slice(&json);
                out.extend_from_slice(b"}\n");
            }
            Err(e) => {
                let line = serde_json::json!({"error": format!("cannot write rows: {e}")});
                out.extend_from_slice(line.to_string().as_bytes());
                out.push(b'\n');
            }
        }
    }
}

/// `shown` of `rows` row indices, evenly spread from the first row: a sample of a large
/// batch spans all of it (every device of a tick, say) rather than showing its head.
fn spread(rows: usize, shown: usize) -> weir_engine::arrow::array::UInt32Array {
    (0..shown)
        .map(|i| (i as u64 * rows as u64 / shown as u64) as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn a_sample_spans_the_whole_batch() {
        assert_eq!(spread(10, 5).values().to_vec(), [0, 2, 4, 6, 8]);
        assert_eq!(spread(8192, 3).values().to_vec(), [0, 2730, 5461]);
        assert_eq!(spread(7, 7).values().to_vec(), [0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(spread(5, 1).values().to_vec(), [0]);
        assert!(spread(5, 0).is_empty());
    }
}
