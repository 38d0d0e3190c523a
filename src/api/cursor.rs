//! Keyset pagination cursors: the sort key of a page's edge row, opaque to clients and
//! authenticated (HMAC-SHA256 with `API_CURSOR_KEY`), bound to the query it came from. A forged
//! cursor, or one taken from another query, is a 400 — never a query the client shaped.
//!
//! Wire form: base64url (no padding) of `1 ‖ direction ‖ timestamp µs (i64 BE) ‖ event_id (16) ‖
//! tag (32)`, the tag over `"audit-api cursor v1" ‖ the same fields ‖ SHA-256 of the query`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use uuid::Uuid;

const VERSION: u8 = 1;
const LEN: usize = 1 + 1 + 8 + 16 + 32;

/// Which side of the edge row the next page lies on, in the query's own order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The rows after the edge (the "next" page).
    After,
    /// The rows before the edge (the "previous" page).
    Before,
}

/// A decoded cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub direction: Direction,
    pub timestamp: DateTime<Utc>,
    pub event_id: Uuid,
}

/// Why a cursor is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CursorError {
    #[error("not a cursor of this API")]
    Malformed,
    #[error("the cursor was not issued for this query (or was altered)")]
    Foreign,
}

/// Signs and checks cursors.
pub struct CursorKey {
    key: SecretString,
}

impl CursorKey {
    pub fn new(key: SecretString) -> Self {
        Self { key }
    }

    fn tag(&self, body: &[u8], query: &[u8; 32]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.key.expose_secret().as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(b"audit-api cursor v1");
        mac.update(body);
        mac.update(query);
        mac
    }

    /// The cursor for `cursor` in the query whose canonical form hashes to `query`.
    pub fn encode(&self, cursor: &Cursor, query: &[u8; 32]) -> String {
        let mut bytes = Vec::with_capacity(LEN);
        bytes.push(VERSION);
        bytes.push(match cursor.direction {
            Direction::After => 0,
            Direction::Before => 1,
        });
        bytes.extend_from_slice(&cursor.timestamp.timestamp_micros().to_be_bytes());
        bytes.extend_from_slice(cursor.event_id.as_bytes());
        let tag = self.tag(&bytes, query).finalize().into_bytes();
        bytes.extend_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Checks and decodes a cursor for the query whose canonical form hashes to `query`.
    pub fn decode(&self, text: &str, query: &[u8; 32]) -> Result<Cursor, CursorError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| CursorError::Malformed)?;
        if bytes.len() != LEN || bytes[0] != VERSION {
            return Err(CursorError::Malformed);
        }
        let (body, tag) = bytes.split_at(LEN - 32);
        self.tag(body, query)
            .verify_slice(tag)
            .map_err(|_| CursorError::Foreign)?;
        let direction = match body[1] {
            0 => Direction::After,
            1 => Direction::Before,
            _ => return Err(CursorError::Malformed),
        };
        let micros =
            i64::from_be_bytes(body[2..10].try_into().map_err(|_| CursorError::Malformed)?);
        let timestamp = DateTime::from_timestamp_micros(micros).ok_or(CursorError::Malformed)?;
        let event_id = Uuid::from_slice(&body[10..26]).map_err(|_| CursorError::Malformed)?;
        Ok(Cursor {
            direction,
            timestamp,
            event_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> CursorKey {
        CursorKey::new(k.to_owned().into())
    }

    fn cursor() -> Cursor {
        Cursor {
            direction: Direction::After,
            timestamp: DateTime::from_timestamp_micros(1_764_000_000_123_456).expect("time"),
            event_id: Uuid::from_u128(0x1234),
        }
    }

    #[test]
    fn a_cursor_round_trips_for_its_own_query() {
        let query = [7u8; 32];
        let text = key("k").encode(&cursor(), &query);
        assert_eq!(key("k").decode(&text, &query), Ok(cursor()));
    }

    #[test]
    fn another_query_another_key_or_one_flipped_bit_is_refused() {
        let query = [7u8; 32];
        let text = key("k").encode(&cursor(), &query);
        assert_eq!(
            key("k").decode(&text, &[8u8; 32]),
            Err(CursorError::Foreign)
        );
        assert_eq!(
            key("other").decode(&text, &query),
            Err(CursorError::Foreign)
        );
        let mut bytes = URL_SAFE_NO_PAD.decode(&text).expect("b64");
        for i in 0..bytes.len() {
            bytes[i] ^= 1;
            let flipped = URL_SAFE_NO_PAD.encode(&bytes);
            assert!(key("k").decode(&flipped, &query).is_err(), "byte {i}");
            bytes[i] ^= 1;
        }
        assert_eq!(
            key("k").decode("not a cursor", &query),
            Err(CursorError::Malformed)
        );
    }
}
