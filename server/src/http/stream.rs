//! `GET /api/v1/events/stream`: server-sent events, one per change notice
//! (`crate::changes`). A reader that falls behind gets a `resync` event and should refetch
//! everything; so should one that reconnects (after a server restart, say).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;

use super::AppState;

/// Comments sent this often keep proxies from closing a quiet stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// `GET /api/v1/events/stream`
pub async fn stream(State(app): AppState) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = app.fleet.changes.subscribe();
    let stop = app.stop.clone();
    // The first event tells the page the stream is up: it fetches everything then.
    let hello = Event::default().event("resync").data("{}");
    let events = futures_util::stream::unfold((rx, Some(hello)), move |(mut rx, first)| {
        let stop = stop.clone();
        async move {
            if let Some(first) = first {
                return Some((Ok(first), (rx, None)));
            }
            let received = tokio::select! {
                // The server is stopping: end the response so the HTTP drain can finish.
                () = stop.cancelled() => return None,
                received = rx.recv() => received,
            };
            let event = match received {
                Ok(change) => match Event::default().event("change").json_data(&change) {
                    Ok(event) => event,
                    Err(_) => Event::default().event("resync").data("{}"),
                },
                Err(RecvError::Lagged(_)) => Event::default().event("resync").data("{}"),
                // The server is stopping.
                Err(RecvError::Closed) => return None,
            };
            Some((Ok(event), (rx, None)))
        }
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}
