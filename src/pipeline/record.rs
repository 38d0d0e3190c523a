//! A Kafka record as the pipeline carries it: owned, detached from librdkafka's buffers.

use std::ffi::{CStr, c_char, c_void};

use rdkafka::Message;
use rdkafka::bindings as rd;
use rdkafka::message::{BorrowedMessage, OwnedHeaders};

use super::offsets::TopicPartition;

/// One consumed record, exactly as it was on the topic.
#[derive(Debug, Clone)]
pub struct SourceRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The record's Kafka timestamp in milliseconds since the epoch, when it has one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    /// `None` for a tombstone; kept apart from an empty payload so the DLQ copy is exact.
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl SourceRecord {
    /// Copies a message out of librdkafka.
    pub fn from_message(message: &BorrowedMessage<'_>) -> Self {
        let headers = read_headers(message);
        SourceRecord {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    /// The payload bytes, empty for a tombstone.
    pub fn payload_bytes(&self) -> &[u8] {
        self.payload.as_deref().unwrap_or_default()
    }

    /// Where the record came from.
    pub fn topic_partition(&self) -> TopicPartition {
        TopicPartition::new(self.topic.clone(), self.partition)
    }

    /// The value of a header, if present and valid UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| std::str::from_utf8(value.as_deref()?).ok())
    }

    /// The original headers, for a copy of the record (the DLQ).
    pub fn owned_headers(&self) -> OwnedHeaders {
        self.headers
            .iter()
            .fold(OwnedHeaders::new(), |headers, (key, value)| {
                headers.insert(rdkafka::message::Header {
                    key,
                    value: value.as_deref(),
                })
            })
    }
}

/// The message's headers, with keys decoded lossily. rdkafka's own header accessor panics on a
/// key that is not UTF-8, and any producer can send one: a poison header must not take the
/// poll thread down.
fn read_headers(message: &BorrowedMessage<'_>) -> Vec<(String, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    // SAFETY: `message.ptr()` is a valid message for the lifetime of `message`; librdkafka owns
    // the headers it returns through `headers` for as long as the message lives, and every
    // name/value pointer it hands out stays valid (and is copied here) within that lifetime.
    unsafe {
        let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        if rd::rd_kafka_message_headers(message.ptr(), &mut headers)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            || headers.is_null()
        {
            return out;
        }
        for idx in 0..rd::rd_kafka_header_cnt(headers) {
            let mut name: *const c_char = std::ptr::null();
            let mut value: *const c_void = std::ptr::null();
            let mut size = 0usize;
            if rd::rd_kafka_header_get_all(headers, idx, &mut name, &mut value, &mut size)
                != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                || name.is_null()
            {
                continue;
            }
            let key = CStr::from_ptr(name).to_string_lossy().into_owned();
            let value = (!value.is_null())
                .then(|| std::slice::from_raw_parts(value.cast::<u8>(), size).to_vec());
            out.push((key, value));
        }
    }
    out
}
