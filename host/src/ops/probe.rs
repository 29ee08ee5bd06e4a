//! `protean-host health`: ask a running server's `/readyz` and say, in one line, whether it is ready.
//!
//! A plain HTTP/1.1 GET over a TCP stream: the probe talks only to our own server, over `http://` on a
//! local or cluster address, so a general HTTP client (and its TLS and URL stacks) is not worth its
//! weight in the binary.

use std::{
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    time::Duration,
};

/// Why the probe could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("--url {0:?} is not an http:// URL; write http://HOST:PORT/readyz")]
    Url(String),
    #[error("cannot reach {url}: {source}; is protean-host running with its health server on that address?")]
    Connect { url: String, source: std::io::Error },
    #[error("{url} answered something that is not HTTP: {reason}")]
    Answer { url: String, reason: NotHttp },
}

/// What an answer lacks to be read as HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotHttp {
    #[error("no end of headers")]
    NoEndOfHeaders,
    #[error("no status line")]
    NoStatusLine,
}

/// An HTTP answer: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// GET `url` (`http://HOST:PORT/PATH`), waiting at most `timeout` for each step.
pub fn get(url: &str, timeout: Duration) -> Result<Answer, ProbeError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ProbeError::Url(url.into()))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    if authority.is_empty() {
        return Err(ProbeError::Url(url.into()));
    }
    let connect = |source| ProbeError::Connect {
        url: url.into(),
        source,
    };
    let address = authority
        .to_socket_addrs()
        .map_err(connect)?
        .next()
        .ok_or_else(|| ProbeError::Url(url.into()))?;
    let mut stream = TcpStream::connect_timeout(&address, timeout).map_err(connect)?;
    stream.set_read_timeout(Some(timeout)).map_err(connect)?;
    stream.set_write_timeout(Some(timeout)).map_err(connect)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(connect)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(connect)?;
    parse(&raw).map_err(|reason| ProbeError::Answer {
        url: url.into(),
        reason,
    })
}

/// Status line and body of an HTTP/1.1 response (the server sends a Content-Length, not chunks).
fn parse(raw: &[u8]) -> Result<Answer, NotHttp> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(NotHttp::NoEndOfHeaders)?;
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or(NotHttp::NoStatusLine)?;
    Ok(Answer {
        status,
        body: body.to_owned(),
    })
}

/// One line for an answer of `/readyz`: `ready`, or `not ready: ` and the reasons it gave.
pub fn verdict(answer: &Answer) -> (bool, String) {
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
    let reasons: Vec<&str> = body["reasons"]
        .as_array()
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    match (answer.status, reasons.is_empty()) {
        (200, _) => (true, "ready".into()),
        (status, true) => (false, format!("not ready: HTTP {status}")),
        (_, false) => (false, format!("not ready: {}", reasons.join("; "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_and_judged() {
        let answer = parse(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 40\r\n\r\n{\"reasons\":[\"broker: down\",\"x stalled\"]}").unwrap();
        assert_eq!(answer.status, 503);
        assert_eq!(
            verdict(&answer),
            (false, "not ready: broker: down; x stalled".to_owned())
        );
        let ok = parse(b"HTTP/1.1 200 OK\r\n\r\n{}").unwrap();
        assert_eq!(verdict(&ok), (true, "ready".to_owned()));
        assert_eq!(parse(b"garbage"), Err(NotHttp::NoEndOfHeaders));
        assert_eq!(
            parse(b"\r\n\r\n{}").unwrap_err().to_string(),
            "no status line"
        );
        assert!(matches!(
            get("https://x/readyz", Duration::from_secs(1)),
            Err(ProbeError::Url(_))
        ));
    }
}
