//! Plain HTTP/1.1 requests to the health server (no client library: the tests also send malformed
//! requests, which a client library would refuse to write).

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

/// Send raw bytes, read the whole answer (the request asks the server to close): status and body.
pub fn raw(address: &str, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub fn request(address: &str, method: &str, path: &str) -> (u16, String) {
    let text = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    raw(address, text.as_bytes())
}

pub fn get(address: &str, path: &str) -> (u16, String) {
    request(address, "GET", path)
}
