//! `GET /api/v1/openapi.json`: the API described as an OpenAPI 3.1 document, kept next to
//! the routes it describes (a test checks that every route is in it).

use axum::http::header;
use axum::response::{IntoResponse, Response};

pub const DOCUMENT: &str = include_str!("openapi.json");

pub async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_json_and_names_every_route() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let routes = include_str!("mod.rs");
        for line in routes
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".route(\""))
        {
            let path = line.split('"').next().unwrap();
            assert!(doc["paths"].get(path).is_some(), "{path} is not documented");
        }
    }
}
