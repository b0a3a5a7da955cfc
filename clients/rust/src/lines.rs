//! Reading newline-delimited lines with a bound on how much of one line is ever held.
//!
//! The server's stdout and stderr are read through [`read_segment`], which stops at a newline
//! or at a byte limit, whichever comes first. Stdout treats a line over its limit as an error
//! of the call it answers, and reads the rest of it through [`skip_line`], which keeps only its
//! two ends (where the id can be found); stderr forwards a long line in pieces.

use std::io;

use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// How much of each end of an oversized line is kept to look for its id.
pub(crate) const EDGE: usize = 4096;

/// Where [`read_segment`] stopped.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Segment {
    /// At a newline (consumed, not appended): the buffer holds a whole line.
    Line,
    /// At the limit: the buffer holds exactly `limit` bytes and the line goes on.
    Full,
    /// At the end of input: the buffer holds what came after the last newline, if anything.
    Eof,
}

/// Appends to `buf` the bytes up to the next newline, stopping early once `buf` holds `limit`
/// bytes and the next byte is not a newline (so a line of exactly `limit` bytes is whole).
pub(crate) async fn read_segment<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<Segment> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(Segment::Eof);
        }
        let room = limit.saturating_sub(buf.len());
        let look = available.len().min(room.saturating_add(1));
        if let Some(newline) = available[..look].iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&available[..newline]);
            reader.consume(newline + 1);
            return Ok(Segment::Line);
        }
        if look > room {
            buf.extend_from_slice(&available[..room]);
            reader.consume(room);
            return Ok(Segment::Full);
        }
        buf.extend_from_slice(&available[..look]);
        reader.consume(look);
    }
}

/// Reads the rest of a line that [`read_segment`] found too long, holding at most [`EDGE`]
/// bytes of it at a time. `head` is cut to its first [`EDGE`] bytes; returns the last
/// [`EDGE`] bytes of the line and whether the input ended.
pub(crate) async fn skip_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    head: &mut Vec<u8>,
) -> io::Result<(Vec<u8>, bool)> {
    let mut tail = head[head.len().saturating_sub(EDGE)..].to_vec();
    head.truncate(EDGE);
    loop {
        let start = tail.len();
        let segment = read_segment(reader, &mut tail, start + EDGE).await?;
        if tail.len() > EDGE {
            tail.drain(..tail.len() - EDGE);
        }
        match segment {
            Segment::Full => {}
            Segment::Line => return Ok((tail, false)),
            Segment::Eof => return Ok((tail, true)),
        }
    }
}

/// The id of an answer from its ends alone: `{"jsonrpc":"2.0","id":N,...` at the start, as a
/// client writes it, or `...,"id":N}` at the end, as the server writes it. Only there is it
/// certainly the answer's own id and not a key inside its result.
pub(crate) fn edge_id(head: &[u8], tail: &[u8]) -> Option<u64> {
    leading_id(head).or_else(|| trailing_id(tail))
}

fn leading_id(head: &[u8]) -> Option<u64> {
    let rest = head
        .trim_ascii_start()
        .strip_prefix(b"{")?
        .trim_ascii_start();
    let rest = skip_jsonrpc_member(rest).unwrap_or(rest);
    let rest = rest
        .strip_prefix(b"\"id\"")?
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start();
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let (number, after) = rest.split_at(digits);
    match after.trim_ascii_start().first() {
        Some(b',' | b'}') => parse_id(number),
        _ => None,
    }
}

fn skip_jsonrpc_member(rest: &[u8]) -> Option<&[u8]> {
    let rest = rest
        .strip_prefix(b"\"jsonrpc\"")?
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start()
        .strip_prefix(b"\"2.0\"")?
        .trim_ascii_start()
        .strip_prefix(b",")?;
    Some(rest.trim_ascii_start())
}

fn trailing_id(tail: &[u8]) -> Option<u64> {
    let rest = tail.trim_ascii_end().strip_suffix(b"}")?.trim_ascii_end();
    let digits = rest.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    let (rest, number) = rest.split_at(rest.len() - digits);
    let rest = rest
        .trim_ascii_end()
        .strip_suffix(b":")?
        .trim_ascii_end()
        .strip_suffix(b"\"id\"")?
        .trim_ascii_end();
    (rest.ends_with(b",") || rest.ends_with(b"{"))
        .then(|| parse_id(number))
        .flatten()
}

fn parse_id(digits: &[u8]) -> Option<u64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The id of a line that is not a readable JSON-RPC message: its top-level `id` if the line
/// is JSON at all, else whatever [`edge_id`] finds at its ends.
pub(crate) fn loose_id(line: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: Option<Value>,
    }
    match serde_json::from_slice::<IdOnly>(line) {
        Ok(message) => message.id.as_ref().and_then(Value::as_u64),
        Err(_) => edge_id(
            &line[..line.len().min(EDGE)],
            &line[line.len().saturating_sub(EDGE)..],
        ),
    }
}

/// How many leading bytes of `piece` can be forwarded without splitting a UTF-8 character:
/// all of them, unless the piece ends inside one (then that character waits for the next
/// piece). Never 0 for a piece of 4 bytes or more.
pub(crate) fn utf8_cut(piece: &[u8]) -> usize {
    match std::str::from_utf8(piece) {
        Err(error) if error.error_len().is_none() && error.valid_up_to() > 0 => error.valid_up_to(),
        _ => piece.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    /// Every segment of `input` read with `limit` through a 7-byte buffer (so segments cross
    /// buffer refills).
    async fn segments(input: &[u8], limit: usize) -> Vec<(Segment, String)> {
        let mut reader = BufReader::with_capacity(7, input);
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            let segment = read_segment(&mut reader, &mut buf, limit).await.unwrap();
            let eof = segment == Segment::Eof;
            out.push((segment, String::from_utf8(buf).unwrap()));
            if eof {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn lines_up_to_the_limit_are_whole_and_longer_ones_stop_at_it() {
        use Segment::*;
        assert_eq!(
            segments(b"abcd\nabcde\nab", 4).await,
            [
                (Line, "abcd".into()),
                (Full, "abcd".into()),
                (Line, "e".into()),
                (Eof, "ab".into())
            ]
        );
        assert_eq!(
            segments(b"0123456789abcdefghij\n\n", 100).await,
            [
                (Line, "0123456789abcdefghij".into()),
                (Line, "".into()),
                (Eof, "".into())
            ]
        );
    }

    #[tokio::test]
    async fn an_oversized_line_is_skipped_keeping_its_ends() {
        let middle = "m".repeat(3 * EDGE);
        let input = format!("{{\"head\":\"{middle}\",\"id\":42}}\nnext\n");
        let mut reader = BufReader::with_capacity(1000, input.as_bytes());
        let mut line = Vec::new();
        let segment = read_segment(&mut reader, &mut line, 100).await.unwrap();
        assert_eq!((segment, line.len()), (Segment::Full, 100));
        let (tail, eof) = skip_line(&mut reader, &mut line).await.unwrap();
        assert!(!eof);
        assert!(line.starts_with(b"{\"head\":\"mmm") && line.len() == 100);
        assert_eq!(tail.len(), EDGE);
        assert!(tail.ends_with(b"m\",\"id\":42}"));
        assert_eq!(edge_id(&line, &tail), Some(42));
        let mut next = Vec::new();
        read_segment(&mut reader, &mut next, 100).await.unwrap();
        assert_eq!(next, b"next", "the reader is at the next line");
    }

    #[test]
    fn ids_are_read_only_where_they_are_the_messages_own() {
        let at_start: &[u8] = br#"{"jsonrpc":"2.0","id":7,"result":{"text":"..."#;
        assert_eq!(edge_id(at_start, b"garbage"), Some(7));
        assert_eq!(edge_id(br#"{ "id" : 8 , "res"#, b""), Some(8));
        assert_eq!(edge_id(b"", br#"...":true}},"id":9}"#), Some(9));
        assert_eq!(edge_id(b"", b"..., \"id\" : 10 }\r\n"), Some(10));
        // An "id" inside the result, or no id at all.
        assert_eq!(edge_id(br#"{"result":{"id":3,"#, br#"x","id":4}}"#), None);
        assert_eq!(edge_id(b"xxxx", b"xxxx"), None);
        assert_eq!(edge_id(br#"{"id":-1,"#, br#","id":"s"}"#), None);
    }

    #[test]
    fn a_loose_id_comes_from_json_or_from_the_ends() {
        assert_eq!(loose_id(br#"{"id":5,"error":{"code":1}}"#), Some(5));
        assert_eq!(
            loose_id(br#"{"jsonrpc":"2.0","result":"\xff","id":6}"#),
            Some(6)
        );
        assert_eq!(loose_id(b"null"), None);
        assert_eq!(loose_id(b"not json"), None);
    }

    #[test]
    fn pieces_are_cut_between_characters() {
        let text = "ab\u{e9}".as_bytes(); // é is two bytes
        assert_eq!(utf8_cut(text), 4);
        assert_eq!(utf8_cut(&text[..3]), 2, "half an é waits");
        assert_eq!(utf8_cut(b"\xff\xfe"), 2, "invalid bytes go as they are");
    }
}
