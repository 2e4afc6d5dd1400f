//! Holds: the robot's own software asks the agent not to swap models now ("I am driving").
//!
//! A hold is a lease: its holder names itself, says why and for how long (at most
//! [`HoldsConfig::max_ttl_s`](crate::config::HoldsConfig)), and renews it by asking again
//! before it runs out. A holder that crashes stops renewing, so its hold ends by itself: no
//! hold outlives its deadline or its holder by more than one lease. Download and gate go
//! on while a hold stands; only the swap waits. Holds are kept in `{data_dir}/holds.json`
//! (written crash-safely), so a restarted agent honours the holds placed before it; expired
//! ones are dropped on reading.
//!
//! The local API (`POST /v1/holds`, `GET /v1/holds`, `DELETE /v1/holds/{holder}`) answers on
//! the agent's Unix socket and on its TCP listener when that listens on loopback.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use botfleet_protocol::messages::HoldInfo;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

const FILE: &str = "holds.json";
/// Longest holder name and reason accepted.
const MAX_HOLDER: usize = 64;
const MAX_REASON: usize = 256;
/// Most holds at once (one per holder).
const MAX_HOLDS: usize = 64;

/// What a holder asks for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldRequest {
    pub holder: String,
    pub reason: String,
    /// Seconds from now until the hold expires unless renewed.
    pub ttl_s: u64,
}

/// Why a hold was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    #[error(
        "holder must be 1 to {MAX_HOLDER} characters of letters, digits, '.', '_' or '-', not {0:?}"
    )]
    Holder(String),
    #[error("reason must be 1 to {MAX_REASON} bytes")]
    Reason,
    #[error("ttl_s must be 1 to {max} seconds (renew the hold before it ends), not {asked}")]
    Ttl { asked: u64, max: u64 },
    #[error("{MAX_HOLDS} holders hold already; release one first")]
    TooMany,
    #[error("cannot keep the hold: {0}")]
    Store(String),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Book {
    holds: BTreeMap<String, HoldInfo>,
}

impl Book {
    fn prune(&mut self, now: Timestamp) -> bool {
        let before = self.holds.len();
        self.holds.retain(|_, hold| hold.until > now);
        self.holds.len() != before
    }
}

/// Every hold on this robot; cheap to clone and share.
#[derive(Debug, Clone)]
pub struct Holds {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    book: Mutex<Book>,
    path: PathBuf,
    max_ttl_s: u64,
    /// Bumped on every change, so the reconciler looks again.
    changed: watch::Sender<u64>,
}

fn valid_holder(holder: &str) -> bool {
    (1..=MAX_HOLDER).contains(&holder.len())
        && holder
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Holds {
    /// The holds kept in `data_dir`, less those that expired meanwhile. A file that cannot be
    /// read is logged and treated as no holds (it is replaced on the next change).
    pub fn open(data_dir: &std::path::Path, max_ttl_s: u64) -> Self {
        let path = data_dir.join(FILE);
        let mut book = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "ignoring an unreadable holds file");
                Book::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Book::default(),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read the holds file");
                Book::default()
            }
        };
        book.prune(Timestamp::now());
        Self {
            inner: Arc::new(Inner {
                book: Mutex::new(book),
                path,
                max_ttl_s: max_ttl_s.max(1),
                changed: watch::Sender::new(0),
            }),
        }
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // A panic while holding it cannot leave the map half-changed: every change is one
        // insert or remove.
        self.inner
            .book
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn save(&self, book: &Book) -> Result<(), HoldError> {
        let bytes = serde_json::to_vec_pretty(book).map_err(|e| HoldError::Store(e.to_string()))?;
        crate::store::write_atomic(&self.inner.path, &bytes)
            .map_err(|e| HoldError::Store(e.to_string()))
    }

    fn notify(&self) {
        self.inner.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Places or renews `request.holder`'s hold, from `now`.
    pub fn put(&self, request: &HoldRequest, now: Timestamp) -> Result<HoldInfo, HoldError> {
        if !valid_holder(&request.holder) {
            return Err(HoldError::Holder(request.holder.clone()));
        }
        if request.reason.is_empty() || request.reason.len() > MAX_REASON {
            return Err(HoldError::Reason);
        }
        let max = self.inner.max_ttl_s;
        if !(1..=max).contains(&request.ttl_s) {
            return Err(HoldError::Ttl {
                asked: request.ttl_s,
                max,
            });
        }
        let until = now + SignedDuration::from_secs(request.ttl_s as i64);
        let hold = HoldInfo {
            holder: request.holder.clone(),
            reason: request.reason.clone(),
            until,
        };
        let mut book = self.book();
        book.prune(now);
        if !book.holds.contains_key(&hold.holder) && book.holds.len() >= MAX_HOLDS {
            return Err(HoldError::TooMany);
        }
        let renewed = book
            .holds
            .insert(hold.holder.clone(), hold.clone())
            .is_some();
        if let Err(e) = self.save(&book) {
            // Kept in memory all the same: the robot asked not to be disturbed now.
            warn!(error = %e, "hold placed but not persisted");
        }
        drop(book);
        if !renewed {
            info!(holder = %hold.holder, reason = %hold.reason, until = %hold.until, "swaps held");
        }
        self.notify();
        Ok(hold)
    }

    /// Ends `holder`'s hold; `false` when it had none.
    pub fn release(&self, holder: &str, now: Timestamp) -> bool {
        let mut book = self.book();
        book.prune(now);
        let released = book.holds.remove(holder).is_some();
        if released {
            if let Err(e) = self.save(&book) {
                warn!(error = %e, "hold released but the file not rewritten");
            }
            info!(holder, "hold released");
        }
        drop(book);
        if released {
            self.notify();
        }
        released
    }

    /// The holds standing at `now`, by holder.
    pub fn active(&self, now: Timestamp) -> Vec<HoldInfo> {
        let mut book = self.book();
        book.prune(now);
        book.holds.values().cloned().collect()
    }

    /// Changes whenever a hold is placed, renewed or released (not when one expires: the
    /// reader wakes at the deadline it was given).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }
}

/// A refusal as the API answers it.
impl IntoResponse for HoldError {
    fn into_response(self) -> Response {
        let status = match self {
            HoldError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            HoldError::TooMany => StatusCode::CONFLICT,
            _ => StatusCode::BAD_REQUEST,
        };
        let body = serde_json::json!({ "error": self.to_string() });
        (status, Json(body)).into_response()
    }
}

/// `POST /v1/holds`, `GET /v1/holds`, `DELETE /v1/holds/{holder}`.
pub fn router(holds: Holds) -> Router {
    Router::new()
        .route("/v1/holds", get(list).post(place))
        .route("/v1/holds/{holder}", delete(release))
        .with_state(holds)
}

async fn place(
    State(holds): State<Holds>,
    request: Result<Json<HoldRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<HoldInfo>, Response> {
    let Json(request) = request.map_err(|e| {
        let body = serde_json::json!({ "error": format!("a hold is {{\"holder\", \"reason\", \"ttl_s\"}}: {}", e.body_text()) });
        (StatusCode::BAD_REQUEST, Json(body)).into_response()
    })?;
    holds
        .put(&request, Timestamp::now())
        .map(Json)
        .map_err(IntoResponse::into_response)
}

async fn list(State(holds): State<Holds>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "holds": holds.active(Timestamp::now()) }))
}

async fn release(State(holds): State<Holds>, Path(holder): Path<String>) -> StatusCode {
    if holds.release(&holder, Timestamp::now()) {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn ask(holder: &str, ttl_s: u64) -> HoldRequest {
        HoldRequest {
            holder: holder.into(),
            reason: "driving".into(),
            ttl_s,
        }
    }

    #[test]
    fn a_hold_stands_until_its_deadline_and_renewing_moves_it() {
        let dir = tempfile::tempdir().unwrap();
        let holds = Holds::open(dir.path(), 600);
        let hold = holds.put(&ask("nav", 30), t(0)).unwrap();
        assert_eq!(hold.until, t(30));
        assert_eq!(holds.active(t(29)).len(), 1);
        assert!(holds.active(t(30)).is_empty(), "expired at its deadline");
        holds.put(&ask("nav", 30), t(10)).unwrap();
        holds.put(&ask("nav", 30), t(35)).unwrap();
        assert_eq!(
            holds.active(t(64))[0].until,
            t(65),
            "renewed from the time asked"
        );
        assert!(holds.release("nav", t(40)));
        assert!(!holds.release("nav", t(40)));
        assert!(holds.active(t(40)).is_empty());
    }

    #[test]
    fn holds_survive_a_restart_and_expired_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let now = Timestamp::now();
        {
            let holds = Holds::open(dir.path(), 600);
            holds.put(&ask("nav", 300), now).unwrap();
            holds
                .put(&ask("arm", 1), now - SignedDuration::from_secs(5))
                .unwrap();
        }
        let again = Holds::open(dir.path(), 600);
        let standing: Vec<_> = again.active(now).into_iter().map(|h| h.holder).collect();
        assert_eq!(standing, ["nav"]);
    }

    #[test]
    fn bad_requests_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let holds = Holds::open(dir.path(), 60);
        assert_eq!(
            holds.put(&ask("nav", 61), t(0)),
            Err(HoldError::Ttl { asked: 61, max: 60 })
        );
        assert!(matches!(
            holds.put(&ask("nav", 0), t(0)),
            Err(HoldError::Ttl { .. })
        ));
        assert!(matches!(
            holds.put(&ask("n a v", 5), t(0)),
            Err(HoldError::Holder(_))
        ));
        assert!(matches!(
            holds.put(&ask("", 5), t(0)),
            Err(HoldError::Holder(_))
        ));
        let mut long = ask("nav", 5);
        long.reason = "x".repeat(MAX_REASON + 1);
        assert_eq!(holds.put(&long, t(0)), Err(HoldError::Reason));
        assert!(holds.active(t(0)).is_empty());
        assert!(!dir.path().join(FILE).exists(), "nothing was written");
    }

    #[test]
    fn an_unreadable_file_means_no_holds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        let holds = Holds::open(dir.path(), 60);
        assert!(holds.active(Timestamp::now()).is_empty());
        holds.put(&ask("nav", 5), Timestamp::now()).unwrap();
        assert_eq!(
            Holds::open(dir.path(), 60).active(Timestamp::now()).len(),
            1
        );
    }
}
