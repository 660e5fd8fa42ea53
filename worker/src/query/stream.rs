//! Streaming a query's answer: the range read page by page from its shard and sent as chunks,
//! each a complete response under the server's max_payload.

use std::sync::Arc;

use async_nats::Subject;
use logstore_protocol::{ErrorBody, ErrorCode, LogEntry, Order, QueryRequest, Timestamp};

use super::Queries;
use crate::follow::Lanes;
use crate::outbox::format_ts;
use crate::store::store_error_body;
use crate::store::{FirstPage, ReadRange, Row, Shard};

/// Rows read per database round trip when streaming a whole log.
const PAGE_ROWS: u64 = 1000;
/// Room kept in every chunk for the closing `],"next":…,"last":…}`.
const TRAILER_RESERVE: usize = 64;

impl Queries {
    /// Read the requested range page by page and send it as chunks no larger than the server's
    /// max_payload. Memory holds one page and one chunk at a time, whatever the log's size.
    /// Stops after `max_bytes` with a `next` cursor, so one small request cannot make the worker
    /// send an unbounded answer; a client that follows `next` still reads everything.
    ///
    /// Oldest first, the cursor moves up from `after`; newest first, down from `before`. Either
    /// way `next` is the seq of the last entry sent, which is what the request's own cursor
    /// field (`after`, resp. `before`) takes to continue.
    pub(super) async fn stream(
        &self,
        lanes: &Arc<dyn Lanes>,
        shard: &Arc<Shard>,
        request: &QueryRequest,
        subject: &Subject,
    ) -> Result<(), ErrorBody> {
        let wanted = request.limit.unwrap_or(u64::MAX);
        let desc = request.order == Order::Desc;
        let range = ReadRange {
            after: request.after,
            before: request.before,
            since: request.since.map(Timestamp::to_system_time),
            until: request.until.map(Timestamp::to_system_time),
            desc,
        };
        // The shard that holds the object at the first page's snapshot: the later pages read
        // there too (an object that moved meanwhile keeps its old copy until every read that
        // began on it has ended: MOVE_GRACE_MS).
        let (first, shard) = self
            .locate(lanes, shard, request.id, |shard, epoch| {
                let range = &range;
                async move {
                    let page = shard
                        .first_page(request.id, range, wanted.min(PAGE_ROWS), epoch)
                        .await?;
                    let exists = page.exists;
                    Ok((page, exists))
                }
            })
            .await?;
        self.send_pages(&shard, request, first, subject).await
    }

    /// Send `first` and the pages after it from `shard` (see [`Queries::stream`]), ending with
    /// the last chunk and its `next` cursor.
    async fn send_pages(
        &self,
        shard: &Shard,
        request: &QueryRequest,
        first: FirstPage,
        subject: &Subject,
    ) -> Result<(), ErrorBody> {
        let wanted = request.limit.unwrap_or(u64::MAX);
        let desc = request.order == Order::Desc;
        let (lo, hi) = (first.lo, first.hi);
        // Whether entries of the range remain beyond `cursor` in the reading direction.
        let more_after = |cursor: u64| {
            if desc {
                cursor > lo.saturating_add(1)
            } else {
                cursor.saturating_add(1) < hi
            }
        };
        let mut writer = ChunkWriter::new(request, first.total, self.outbox.max_payload())?;
        let mut sent = 0u64;
        let mut cursor = if desc { hi } else { lo };
        let mut rows: Vec<Row> = first.rows;
        let mut capped = false;
        'pages: loop {
            let fetched = rows.len() as u64;
            for row in rows.drain(..) {
                if writer.bytes() >= self.max_bytes && sent > 0 {
                    capped = true;
                    break 'pages;
                }
                let entry = LogEntry {
                    seq: row.seq,
                    ts: format_ts(row.ts),
                    log: row.log,
                };
                if let Some(chunk) = writer.push(&entry)? {
                    self.outbox.response(subject, chunk).await;
                }
                cursor = row.seq;
                sent += 1;
            }
            let asked = (wanted - (sent - fetched)).min(PAGE_ROWS);
            if sent >= wanted || fetched < asked || !more_after(cursor) {
                break;
            }
            let (page_lo, page_hi) = if desc { (lo, cursor) } else { (cursor, hi) };
            rows = shard
                .page(
                    request.id,
                    page_lo,
                    page_hi,
                    desc,
                    (wanted - sent).min(PAGE_ROWS),
                )
                .await
                .map_err(|e| store_error_body(&e))?;
        }
        let next = ((capped || sent >= wanted) && sent > 0 && more_after(cursor)).then_some(cursor);
        self.outbox.response(subject, writer.finish(next)).await;
        Ok(())
    }
}

/// Builds query response chunks as JSON text, each a complete, valid response under the size
/// budget. Written by hand (not by serializing a `QueryResponse`) so a chunk is filled entry by
/// entry without knowing in advance how many fit.
struct ChunkWriter {
    /// Everything before the `"chunk"` number, identical in every chunk.
    head: String,
    buf: Vec<u8>,
    entries: usize,
    chunk: u32,
    last_seq_in_chunk: u64,
    max_payload: usize,
    /// Bytes of the chunks already handed out.
    sent_bytes: usize,
}

impl ChunkWriter {
    fn new(
        request: &QueryRequest,
        total: u64,
        max_payload: usize,
    ) -> Result<ChunkWriter, ErrorBody> {
        let mut head = format!("{{\"id\":{}", request.id);
        if let Some(request_id) = &request.request_id {
            let quoted = serde_json::to_string(request_id)
                .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?;
            head.push_str(",\"request_id\":");
            head.push_str(&quoted);
        }
        head.push_str(&format!(",\"total\":{total},\"chunk\":"));
        let mut writer = ChunkWriter {
            head,
            buf: Vec::new(),
            entries: 0,
            chunk: 0,
            last_seq_in_chunk: 0,
            max_payload,
            sent_bytes: 0,
        };
        writer.open();
        if writer.buf.len() + TRAILER_RESERVE > max_payload {
            return Err(ErrorBody::new(
                ErrorCode::TooLarge,
                "request_id is too large for one response message",
            ));
        }
        Ok(writer)
    }

    /// Bytes of this answer so far (chunks handed out plus the one being filled).
    fn bytes(&self) -> usize {
        self.sent_bytes + self.buf.len()
    }

    fn open(&mut self) {
        self.buf.clear();
        self.buf.extend_from_slice(self.head.as_bytes());
        self.buf
            .extend_from_slice(format!("{},\"logs\":[", self.chunk).as_bytes());
        self.entries = 0;
    }

    /// Add an entry; returns a full chunk to send first when the entry does not fit in this one.
    fn push(&mut self, entry: &LogEntry) -> Result<Option<Vec<u8>>, ErrorBody> {
        let encoded = serde_json::to_vec(entry)
            .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?;
        let mut full = None;
        if self.buf.len() + 1 + encoded.len() + TRAILER_RESERVE > self.max_payload {
            if self.entries == 0 {
                return Err(ErrorBody::new(
                    ErrorCode::TooLarge,
                    format!(
                        "entry {} does not fit in one message of {} bytes (server max_payload)",
                        entry.seq, self.max_payload
                    ),
                ));
            }
            full = Some(self.close(Some(self.last_seq_in_chunk), false));
            self.chunk += 1;
            self.open();
        }
        if self.entries > 0 {
            self.buf.push(b',');
        }
        self.buf.extend_from_slice(&encoded);
        self.entries += 1;
        self.last_seq_in_chunk = entry.seq;
        Ok(full)
    }

    fn close(&mut self, next: Option<u64>, last: bool) -> Vec<u8> {
        let next = next.map_or_else(|| "null".to_string(), |n| n.to_string());
        self.buf
            .extend_from_slice(format!("],\"next\":{next},\"last\":{last}}}").as_bytes());
        self.sent_bytes += self.buf.len();
        std::mem::take(&mut self.buf)
    }

    /// The final chunk.
    fn finish(mut self, next: Option<u64>) -> Vec<u8> {
        self.close(next, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logstore_protocol::QueryResponse;

    /// Chunks of 50 entries pushed in `seqs` order (ascending or descending).
    fn chunks_of(seqs: &[u64]) -> Vec<Vec<u8>> {
        let request = QueryRequest {
            id: 7,
            after: 0,
            before: None,
            order: Order::Asc,
            since: None,
            until: None,
            limit: None,
            request_id: Some("r\"1".into()),
        };
        let mut writer = ChunkWriter::new(&request, 50, 600).unwrap();
        let mut chunks = Vec::new();
        for &seq in seqs {
            let entry = LogEntry {
                seq,
                ts: "2026-11-22T09:16:27.123456Z".into(),
                log: "x".repeat(20),
            };
            if let Some(chunk) = writer.push(&entry).unwrap() {
                chunks.push(chunk);
            }
        }
        chunks.push(writer.finish(None));
        chunks
    }

    #[test]
    fn chunks_are_valid_responses_under_the_budget() {
        for order in [Order::Asc, Order::Desc] {
            let mut sent: Vec<u64> = (1..=50).collect();
            if order == Order::Desc {
                sent.reverse();
            }
            check_chunks(&chunks_of(&sent), &sent);
        }
    }

    /// Every chunk fits, parses and is numbered; a non-final chunk's `next` is the seq of its
    /// last entry (the cursor for `after`, or for `before` when newest first).
    fn check_chunks(chunks: &[Vec<u8>], sent: &[u64]) {
        assert!(chunks.len() > 3);
        let mut seqs = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            assert!(chunk.len() <= 600, "chunk {i} is {} bytes", chunk.len());
            let response: QueryResponse = serde_json::from_slice(chunk).unwrap();
            assert_eq!(response.chunk as usize, i);
            assert_eq!(response.last, i == chunks.len() - 1);
            assert_eq!(response.request_id.as_deref(), Some("r\"1"));
            assert_eq!(response.total, 50);
            if !response.last {
                assert_eq!(response.next, response.logs.last().map(|e| e.seq));
            }
            seqs.extend(response.logs.iter().map(|e| e.seq));
        }
        assert_eq!(seqs, sent);
    }
}
