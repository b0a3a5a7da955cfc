//! Stored contexts: what [`crate::RlmClient::load_context`] takes ([`ContextSource`],
//! [`LoadRequest`]) and returns ([`LoadedContext`]), and how it loads them: a text too long
//! for one line goes in `context/load` chunks cut at character boundaries, a reader's or a
//! file's bytes are decoded as UTF-8 as they arrive, and a load abandoned midway drops what
//! it stored.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;

use crate::client::{Deadline, RlmClient, decode};
use crate::connection::Connection;
use crate::error::RlmError;
use crate::protocol::{
    ContextDropParams, ContextLoadParams, ContextLoadResult, ErrorType, Message,
};
use crate::request::encode_params;

/// The smallest chunk: one character written as a JSON string takes at most 6 bytes.
const MIN_CHUNK_BYTES: usize = 6;
/// What a `context/load` line holds besides its chunk (the envelope, the largest id, the
/// context's id and `final`), with room to spare.
const LINE_OVERHEAD: usize = 256;
/// How much is read from a reader at once.
const READ_BLOCK: usize = 64 * 1024;

/// What [`crate::RlmClient::load_context`] stores: a text, a list, or a text read from a
/// reader or a file as it is sent.
///
/// `&str` and `String` convert into a text, `Vec<serde_json::Value>` and `Vec<Message>` into
/// a list; a reader or a file is named with [`ContextSource::reader`] or
/// [`ContextSource::file`] (a `Stream` of bytes becomes a reader through
/// `tokio_util::io::StreamReader`).
#[non_exhaustive]
pub enum ContextSource {
    /// A whole text; in the REPL `context` is that string. Sent in chunks when it is longer
    /// than the chunk size.
    Text(String),
    /// A whole list (chat messages, documents, any JSON values); in the REPL `context` is
    /// that list. Always sent in one line, which the server's `--max-message-bytes` bounds.
    Messages(Vec<Value>),
    /// A text read from a reader as it is sent, never whole in memory. Its bytes must be
    /// UTF-8 ([`RlmError::InvalidUtf8`] otherwise); a character may be split between reads.
    Reader(Box<dyn AsyncRead + Send + Unpin>),
    /// A text file, read as it is sent, like [`ContextSource::Reader`].
    File(PathBuf),
}

impl ContextSource {
    /// A text read from `reader` as it is sent.
    pub fn reader(reader: impl AsyncRead + Send + Unpin + 'static) -> Self {
        Self::Reader(Box::new(reader))
    }

    /// A text read from the file at `path` as it is sent.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self::File(path.into())
    }
}

impl From<String> for ContextSource {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

impl From<&str> for ContextSource {
    fn from(text: &str) -> Self {
        Self::Text(text.to_owned())
    }
}

impl From<Vec<Value>> for ContextSource {
    fn from(messages: Vec<Value>) -> Self {
        Self::Messages(messages)
    }
}

impl From<Vec<Message>> for ContextSource {
    fn from(messages: Vec<Message>) -> Self {
        let values = messages
            .iter()
            .map(|message| serde_json::to_value(message).expect("a message is JSON"))
            .collect();
        Self::Messages(values)
    }
}

impl fmt::Debug for ContextSource {
    /// Shows the size, not the text: it may be hundreds of megabytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text(text) => write!(f, "Text({} bytes)", text.len()),
            Self::Messages(list) => write!(f, "Messages({} items)", list.len()),
            Self::Reader(_) => f.write_str("Reader"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// One [`crate::RlmClient::load_context_with`] call: the source plus the client-side bound and
/// chunk size.
///
/// ```
/// use std::time::Duration;
/// use rlm_client::{ContextSource, LoadRequest};
/// let request = LoadRequest::new(ContextSource::file("book.txt"))
///     .timeout(Duration::from_secs(120))
///     .chunk_bytes(1 << 20);
/// # let _ = request;
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct LoadRequest {
    /// What to store.
    pub source: ContextSource,
    /// Bound of the whole load, reading the source included; defaults to
    /// [`crate::RlmConfig::request_timeout`].
    pub timeout: Option<Duration>,
    /// The most bytes of text one `context/load` line carries, as a JSON string (escapes
    /// counted); defaults to [`crate::RlmConfig::context_chunk_bytes`].
    pub chunk_bytes: Option<usize>,
}

impl LoadRequest {
    /// A load of `source` with the configured timeout and chunk size.
    pub fn new(source: impl Into<ContextSource>) -> Self {
        Self {
            source: source.into(),
            timeout: None,
            chunk_bytes: None,
        }
    }

    /// Sets the bound of the whole load.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the most bytes of text per line (at least 6: one character, escaped).
    pub fn chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunk_bytes = Some(bytes);
        self
    }
}

/// A context the server stores, sealed and ready for [`crate::InferRequest::context`] and
/// [`crate::RlmClient::open_session`]. It lives on the server that stored it until it is
/// dropped ([`crate::RlmClient::drop_context`]), evicted to make room for another, or that
/// server exits; this value is only its description.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadedContext {
    /// The context's id: opaque, random (`ctx-` and 32 hex digits), never reused.
    pub context_id: String,
    /// Its size: the text in UTF-8, or the list as compact JSON (as the server wrote it).
    pub bytes: u64,
    /// Hex SHA-256 of those bytes.
    pub sha256: String,
}

impl TryFrom<ContextLoadResult> for LoadedContext {
    type Error = RlmError;

    /// The context of a load's last answer, which must be sealed.
    fn try_from(result: ContextLoadResult) -> Result<Self, RlmError> {
        match result.sha256 {
            Some(sha256) if result.sealed => Ok(Self {
                context_id: result.context_id,
                bytes: result.bytes,
                sha256,
            }),
            _ => Err(RlmError::Protocol(format!(
                "context {} is not sealed after its last chunk",
                result.context_id
            ))),
        }
    }
}

/// Runs one load on the client's server, bounded by the request's timeout.
pub(crate) async fn load(
    client: &RlmClient,
    request: LoadRequest,
) -> Result<LoadedContext, RlmError> {
    let config = client.config();
    let deadline = Deadline::after(request.timeout.unwrap_or(config.request_timeout));
    let limit = request
        .chunk_bytes
        .unwrap_or(config.context_chunk_bytes)
        .max(MIN_CHUNK_BYTES);
    let load = Load::start(client.clone(), client.connection()?);
    let stored = tokio::time::timeout_at(deadline.at, load.store(request.source, limit))
        .await
        .unwrap_or(Err(RlmError::Timeout(deadline.budget)))?;
    let loaded = LoadedContext::try_from(stored)?;
    load.keep();
    Ok(loaded)
}

/// A load in progress on one server. Unless [`Load::keep`] is called, dropping it drops the
/// context it stored, if any: when its future is dropped, its deadline passes, its source
/// fails, or the server refuses a chunk. A step whose answer has not come when that happens
/// keeps waiting for it in its own task, and drops the context it names then.
struct Load {
    client: RlmClient,
    partial: Arc<Partial>,
}

/// What a load stored so far, shared with the tasks that wait for its steps' answers.
struct Partial {
    connection: Arc<Connection>,
    state: Mutex<PartialState>,
}

#[derive(Default)]
struct PartialState {
    /// The context the answers named, while it is to be dropped if the load is abandoned.
    stored: Option<String>,
    abandoned: bool,
}

impl Partial {
    fn state(&self) -> std::sync::MutexGuard<'_, PartialState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes the context a step's answer names; drops it at once if the load was abandoned.
    fn stored(&self, context_id: &str) {
        let mut state = self.state();
        if state.abandoned {
            self.drop_context(context_id);
        } else {
            state.stored = Some(context_id.to_owned());
        }
    }

    /// The load will not finish: drops what it stored, and what later answers name.
    fn abandon(&self) {
        let mut state = self.state();
        state.abandoned = true;
        if let Some(context_id) = state.stored.take() {
            self.drop_context(&context_id);
        }
    }

    /// `context/drop` as a notification: queued without waiting, so it can be sent from
    /// `Drop`. The server drops the context after any chunk it is still writing.
    fn drop_context(&self, context_id: &str) {
        tracing::debug!(context_id, "dropping the context of an abandoned load");
        let params = ContextDropParams {
            context_id: context_id.to_owned(),
        };
        self.connection.notify("context/drop", &params);
    }
}

impl Load {
    fn start(client: RlmClient, connection: Arc<Connection>) -> Self {
        let state = Mutex::new(PartialState::default());
        let partial = Arc::new(Partial { connection, state });
        Self { client, partial }
    }

    /// The load finished: the context stays.
    fn keep(&self) {
        self.partial.state().stored = None;
    }

    /// Stores `source`, a text in chunks of at most `limit` bytes as JSON. Returns the last
    /// answer.
    async fn store(
        &self,
        source: ContextSource,
        limit: usize,
    ) -> Result<ContextLoadResult, RlmError> {
        let text = match source {
            ContextSource::Messages(messages) => {
                return self
                    .step(&ContextLoadParams {
                        messages: Some(messages),
                        ..ContextLoadParams::default()
                    })
                    .await;
            }
            ContextSource::Text(text) => TextSource::Whole(Some(text)),
            ContextSource::Reader(reader) => TextSource::Reader(Utf8Reader::new(reader)),
            ContextSource::File(path) => TextSource::Reader(Utf8Reader::new(open(&path).await?)),
        };
        self.store_text(Chunks::new(text, limit)).await
    }

    /// A text that fits in one line goes as `text`; a longer one as chunks, each sent after
    /// the answer to the one before (the server appends them in the order it handles them).
    /// A line the server refuses as too long (its `--max-message-bytes` is below the chunk
    /// size) is cut again to fit and sent again.
    async fn store_text(&self, mut chunks: Chunks) -> Result<ContextLoadResult, RlmError> {
        let mut stored: Option<ContextLoadResult> = None;
        loop {
            let chunk = chunks.next().await?;
            let last = chunk.last;
            let context_id = stored.as_ref().map(|s| s.context_id.clone());
            let params = match context_id {
                None if last => ContextLoadParams {
                    text: Some(chunk.text),
                    ..ContextLoadParams::default()
                },
                context_id => chunk_params(chunk, context_id),
            };
            match self.step(&params).await {
                Ok(answer) if last => return Ok(answer),
                Ok(answer) => stored = Some(answer),
                Err(error) => {
                    let limit = shorter_limit(&error, chunks.limit).ok_or(error)?;
                    chunks.put_back(params.chunk.or(params.text).unwrap_or_default(), limit);
                }
            }
        }
    }

    /// One `context/load`, sent and awaited in a task of its own, so that its answer is read
    /// even if the load is abandoned meanwhile. Bounded there by the request timeout; the
    /// load's own deadline bounds the wait here.
    async fn step(&self, params: &ContextLoadParams) -> Result<ContextLoadResult, RlmError> {
        let params = encode_params("context/load", params)?;
        let (client, partial) = (self.client.clone(), self.partial.clone());
        let (answer, answered) = oneshot::channel();
        tokio::spawn(async move {
            let deadline = Deadline::after(client.config().request_timeout);
            let reply = client
                .call(
                    &partial.connection,
                    "context/load",
                    Some(params),
                    None,
                    None,
                    deadline,
                )
                .await;
            let stored = reply.and_then(|raw| decode::<ContextLoadResult>(&raw));
            if let Ok(stored) = &stored {
                partial.stored(&stored.context_id);
            }
            let _ = answer.send(stored);
        });
        answered.await.unwrap_or(Err(RlmError::Closed))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.partial.abandon();
    }
}

/// For a line the server refused as too long (-32600 `line_too_long`, `data.limit` its
/// `--max-message-bytes`), the chunk size that fits it, when that is smaller than `limit`, the
/// one the line was cut with; `None` for any other error.
fn shorter_limit(error: &RlmError, limit: usize) -> Option<usize> {
    let RlmError::InvalidRequest(refused) = error else {
        return None;
    };
    let data = refused.data.as_ref()?;
    let line_limit = data.limit.as_ref()?.count()?;
    let fits = usize::try_from(line_limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(LINE_OVERHEAD)
        .max(MIN_CHUNK_BYTES);
    (data.kind == ErrorType::LineTooLong && fits < limit).then_some(fits)
}

fn chunk_params(chunk: Chunk, context_id: Option<String>) -> ContextLoadParams {
    ContextLoadParams {
        chunk: Some(chunk.text),
        context_id,
        r#final: chunk.last.then_some(true),
        ..ContextLoadParams::default()
    }
}

async fn open(path: &Path) -> Result<Box<dyn AsyncRead + Send + Unpin>, RlmError> {
    match tokio::fs::File::open(path).await {
        Ok(file) => Ok(Box::new(file)),
        Err(error) => Err(RlmError::Read(std::io::Error::new(
            error.kind(),
            format!("{}: {error}", path.display()),
        ))),
    }
}

/// Text that arrives piece by piece: whole, or decoded from a reader.
enum TextSource {
    Whole(Option<String>),
    Reader(Utf8Reader),
}

impl TextSource {
    /// The next piece, `None` at the end.
    async fn next(&mut self) -> Result<Option<String>, RlmError> {
        match self {
            Self::Whole(text) => Ok(text.take()),
            Self::Reader(reader) => reader.next().await,
        }
    }
}

/// Decodes a reader's bytes as UTF-8 as they arrive; a character split between two reads is
/// kept until its end arrives.
struct Utf8Reader {
    reader: Box<dyn AsyncRead + Send + Unpin>,
    /// Bytes read and not decoded yet: at most the start of one character between calls.
    pending: Vec<u8>,
    /// Bytes decoded so far, for the offset of an invalid sequence.
    decoded: u64,
}

impl Utf8Reader {
    fn new(reader: Box<dyn AsyncRead + Send + Unpin>) -> Self {
        Self {
            reader,
            pending: Vec::new(),
            decoded: 0,
        }
    }

    /// The text of the next read (or reads, while they end inside one character), `None` at
    /// the end of the reader.
    async fn next(&mut self) -> Result<Option<String>, RlmError> {
        loop {
            let start = self.pending.len();
            self.pending.resize(start + READ_BLOCK, 0);
            let read = self.reader.read(&mut self.pending[start..]).await;
            self.pending.truncate(start + *read.as_ref().unwrap_or(&0));
            match read.map_err(RlmError::Read)? {
                0 if self.pending.is_empty() => return Ok(None),
                0 => return Err(self.invalid(0)), // the end, inside a character
                _ => {}
            }
            let text = self.decode()?;
            if !text.is_empty() {
                return Ok(Some(text));
            }
        }
    }

    /// The longest prefix of `pending` that is whole characters; what is left is the start of
    /// a character.
    fn decode(&mut self) -> Result<String, RlmError> {
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(error) if error.error_len().is_none() => error.valid_up_to(),
            Err(error) => return Err(self.invalid(error.valid_up_to())),
        };
        let rest = self.pending.split_off(valid);
        let bytes = std::mem::replace(&mut self.pending, rest);
        self.decoded += valid as u64;
        Ok(String::from_utf8(bytes).expect("validated above"))
    }

    fn invalid(&self, at: usize) -> RlmError {
        RlmError::InvalidUtf8 {
            offset: self.decoded + at as u64,
        }
    }
}

/// One piece of a text to send, and whether it is the last.
struct Chunk {
    text: String,
    last: bool,
}

/// A text cut into pieces of at most `limit` bytes as JSON strings (escapes counted, so the
/// line stays bounded whatever the text holds), at character boundaries, reading only as
/// far ahead as the next piece needs.
struct Chunks {
    source: TextSource,
    buffer: String,
    /// Where the text not sent yet begins in `buffer`.
    start: usize,
    /// JSON size of `buffer[start..]`.
    size: usize,
    limit: usize,
    exhausted: bool,
}

impl Chunks {
    fn new(source: TextSource, limit: usize) -> Self {
        Self {
            source,
            buffer: String::new(),
            start: 0,
            size: 0,
            limit,
            exhausted: false,
        }
    }

    /// The next piece. Reads until there is more than a piece or the source ends, so a
    /// piece is known to be the last when it is cut. Not called again after the last.
    async fn next(&mut self) -> Result<Chunk, RlmError> {
        while !self.exhausted && self.size <= self.limit {
            match self.source.next().await? {
                Some(text) => self.push(text),
                None => self.exhausted = true,
            }
        }
        let end = if self.size <= self.limit {
            self.buffer.len()
        } else {
            self.cut()
        };
        let last = self.exhausted && end == self.buffer.len();
        let text = if self.start == 0 && end == self.buffer.len() {
            std::mem::take(&mut self.buffer)
        } else {
            let text = self.buffer[self.start..end].to_owned();
            self.start = end;
            text
        };
        self.size -= json_size(&text);
        Ok(Chunk { text, last })
    }

    /// Takes back a piece the server refused, to cut it again within `limit`.
    fn put_back(&mut self, piece: String, limit: usize) {
        self.size += json_size(&piece);
        self.buffer.replace_range(..self.start, &piece);
        self.start = 0;
        self.limit = limit;
    }

    fn push(&mut self, text: String) {
        self.size += json_size(&text);
        if self.start == self.buffer.len() {
            self.buffer = text;
        } else {
            self.buffer.drain(..self.start);
            self.buffer.push_str(&text);
        }
        self.start = 0;
    }

    /// Where the piece that starts at `start` ends: as many whole characters as fit in
    /// `limit`, and at least one.
    fn cut(&self) -> usize {
        let rest = &self.buffer.as_bytes()[self.start..];
        let mut size = 0;
        let over = rest
            .iter()
            .position(|&byte| {
                size += json_byte_size(byte);
                size > self.limit
            })
            .unwrap_or(rest.len());
        let mut end = self.start + over;
        while !self.buffer.is_char_boundary(end) {
            end -= 1;
        }
        if end == self.start {
            end += self.buffer[end..].chars().next().map_or(0, char::len_utf8);
        }
        end
    }
}

/// The size of `text` written as a JSON string, without its quotes.
fn json_size(text: &str) -> usize {
    text.bytes().map(json_byte_size).sum()
}

/// What one byte of UTF-8 becomes in a JSON string as serde_json writes it: `"` and `\`, and
/// the control characters that have a short escape, take two bytes; the other control
/// characters `\u00XX`; everything else, multi-byte characters included, itself.
fn json_byte_size(byte: u8) -> usize {
    match byte {
        b'"' | b'\\' | b'\x08' | b'\t' | b'\n' | b'\x0c' | b'\r' => 2,
        0..=0x1f => 6,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A reader that returns the given pieces, one per read.
    struct Pieces(VecDeque<Vec<u8>>);

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some(piece) = self.0.pop_front() {
                buf.put_slice(&piece);
            }
            Poll::Ready(Ok(()))
        }
    }

    fn reader(pieces: &[&[u8]]) -> TextSource {
        let pieces = pieces.iter().map(|p| p.to_vec()).collect();
        TextSource::Reader(Utf8Reader::new(Box::new(Pieces(pieces))))
    }

    async fn all_chunks(source: TextSource, limit: usize) -> Result<Vec<(String, bool)>, RlmError> {
        let mut chunks = Chunks::new(source, limit);
        let mut all = Vec::new();
        loop {
            let chunk = chunks.next().await?;
            all.push((chunk.text, chunk.last));
            if chunk.last {
                return Ok(all);
            }
        }
    }

    #[tokio::test]
    async fn a_text_within_the_limit_is_one_last_chunk() {
        for text in ["", "short", "exactly10!"] {
            let chunks = all_chunks(TextSource::Whole(Some(text.into())), 10).await;
            assert_eq!(chunks.unwrap(), [(text.to_owned(), true)]);
        }
    }

    #[tokio::test]
    async fn chunks_fit_the_limit_as_json_and_never_split_a_character() {
        let text = "aé€😀\"\n\u{1}b".repeat(50);
        for limit in [6, 7, 8, 13, 64] {
            let chunks = all_chunks(TextSource::Whole(Some(text.clone())), limit)
                .await
                .unwrap();
            let joined: String = chunks.iter().map(|(t, _)| t.as_str()).collect();
            assert_eq!(joined, text, "limit {limit}");
            for (n, (piece, last)) in chunks.iter().enumerate() {
                let line = serde_json::to_string(piece).unwrap();
                assert!(line.len() - 2 <= limit, "limit {limit}: {line}");
                assert!(!piece.is_empty());
                assert_eq!(*last, n == chunks.len() - 1);
            }
        }
    }

    #[tokio::test]
    async fn a_character_split_between_reads_survives() {
        let euro = "€".as_bytes();
        let smile = "😀".as_bytes();
        let source = reader(&[
            b"ab",
            &euro[..1],
            &euro[1..2],
            &euro[2..],
            &smile[..3],
            &smile[3..],
        ]);
        let chunks = all_chunks(source, 4).await.unwrap();
        let joined: String = chunks.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(joined, "ab€😀");
        assert_eq!(chunks.last().unwrap(), &("😀".to_owned(), true));
    }

    #[tokio::test]
    async fn invalid_utf8_is_an_error_with_its_offset() {
        let error = all_chunks(reader(&[b"abc", b"d\xffe"]), 100)
            .await
            .unwrap_err();
        assert!(
            matches!(error, RlmError::InvalidUtf8 { offset: 4 }),
            "{error}"
        );
        let cut_short = all_chunks(reader(&[b"ab", &"€".as_bytes()[..2]]), 100).await;
        assert!(
            matches!(cut_short, Err(RlmError::InvalidUtf8 { offset: 2 })),
            "the end inside a character"
        );
    }

    #[tokio::test]
    async fn a_piece_put_back_is_cut_again_within_the_new_limit() {
        let mut chunks = Chunks::new(TextSource::Whole(Some("abcdef€gh".into())), 100);
        let whole = chunks.next().await.unwrap();
        assert!(whole.last);
        chunks.put_back(whole.text, 4);
        let mut pieces = Vec::new();
        loop {
            let chunk = chunks.next().await.unwrap();
            pieces.push(chunk.text);
            if chunk.last {
                break;
            }
        }
        assert_eq!(pieces, ["abcd", "ef", "€g", "h"]);
    }

    #[test]
    fn only_a_line_too_long_with_a_smaller_limit_shrinks_the_chunks() {
        let refused = |kind: &str, limit: u64| {
            RlmError::from_rpc(
                serde_json::from_value(serde_json::json!({
                    "code": -32600, "message": "Message too large",
                    "data": {"type": kind, "limit": limit}
                }))
                .unwrap(),
            )
        };
        let too_long = refused("line_too_long", 1256);
        assert_eq!(shorter_limit(&too_long, 4 << 20), Some(1000));
        assert_eq!(shorter_limit(&too_long, 1000), None, "no smaller: give up");
        assert_eq!(shorter_limit(&refused("line_too_long", 10), 100), Some(6));
        assert_eq!(
            shorter_limit(&refused("invalid_request", 1256), 4 << 20),
            None
        );
        assert_eq!(shorter_limit(&RlmError::Closed, 4 << 20), None);
    }

    #[tokio::test]
    async fn an_empty_reader_is_an_empty_text() {
        assert_eq!(
            all_chunks(reader(&[]), 10).await.unwrap(),
            [(String::new(), true)]
        );
    }

    #[test]
    fn only_a_sealed_answer_is_a_loaded_context() {
        let answer = |sealed, sha256: Option<&str>| ContextLoadResult {
            context_id: "ctx-1".into(),
            bytes: 3,
            sha256: sha256.map(str::to_owned),
            sealed,
        };
        let loaded = LoadedContext::try_from(answer(true, Some("ab"))).unwrap();
        assert_eq!((loaded.context_id.as_str(), loaded.bytes), ("ctx-1", 3));
        assert!(LoadedContext::try_from(answer(false, None)).is_err());
    }

    #[test]
    fn messages_become_json_objects() {
        let ContextSource::Messages(list) = ContextSource::from(vec![Message::new("user", "hi")])
        else {
            panic!("a list");
        };
        assert_eq!(list, [serde_json::json!({"role": "user", "content": "hi"})]);
    }
}
