//! Loopback ports and plain HTTP (the metrics endpoint, JSON APIs such as
//! chromedriver's).

use super::wait::WAIT;

/// `GET path` on `addr` over plain HTTP/1.1; returns status and body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let response = tokio::time::timeout(WAIT, read_response(&mut stream))
        .await
        .expect("no HTTP response in time")
        .unwrap();
    parse_response(&String::from_utf8(response).unwrap())
}

/// `method path` on `addr` with an optional JSON body (sent with its
/// Content-Length); returns the status and the body read as JSON (`Null`
/// when empty). Panics when `addr` does not answer within [`WAIT`].
pub async fn http_json(
    method: &str,
    addr: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    try_http_json(method, addr, path, body, WAIT)
        .await
        .unwrap_or_else(|err| panic!("{method} http://{addr}{path}: {err}"))
}

/// [`http_json`] that says what went wrong instead of panicking: a refused
/// connection, no complete response within `timeout`, a body that is not
/// JSON.
pub async fn try_http_json(
    method: &str,
    addr: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: std::time::Duration,
) -> Result<(u16, serde_json::Value), String> {
    use tokio::io::AsyncWriteExt;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(&json_request(method, addr, path, body))
            .await?;
        read_response(&mut stream).await
    };
    let response = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no response within {timeout:?}"))?
        .map_err(|err| err.to_string())?;
    json_response(&response)
}

/// [`try_http_json`] for where no runtime may be awaited (a `Drop`): the
/// same request over a blocking socket.
pub fn try_http_json_blocking(
    method: &str,
    addr: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: std::time::Duration,
) -> Result<(u16, serde_json::Value), String> {
    use std::io::{Read, Write};
    let exchange = || {
        let socket = addr
            .parse::<std::net::SocketAddr>()
            .map_err(std::io::Error::other)?;
        let mut stream = std::net::TcpStream::connect_timeout(&socket, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(&json_request(method, addr, path, body))?;
        let mut response = Vec::new();
        let mut buffer = [0; 8192];
        while !response_complete(&response) {
            let read = stream.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            response.extend_from_slice(&buffer[..read]);
        }
        Ok::<_, std::io::Error>(response)
    };
    json_response(&exchange().map_err(|err| err.to_string())?)
}

/// An HTTP/1.1 request with a JSON body (or none) that asks the server to
/// close the connection after answering.
fn json_request(method: &str, addr: &str, path: &str, body: Option<&serde_json::Value>) -> Vec<u8> {
    let body = body.map(ToString::to_string).unwrap_or_default();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if !body.is_empty() || method != "GET" {
        request.push_str("Content-Type: application/json; charset=utf-8\r\n");
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    request.into_bytes()
}

/// Reads one HTTP/1.1 response: up to the end of what its head announces
/// or, announcing nothing, up to the end of the connection. The connection
/// may stay open after the response although the request asked to close
/// it (chromedriver's does).
async fn read_response(stream: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut response = Vec::new();
    let mut buffer = [0; 8192];
    while !response_complete(&response) {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        response.extend_from_slice(&buffer[..read]);
    }
    Ok(response)
}

/// Whether `response` holds a whole HTTP/1.1 response: its head and all
/// the body its Content-Length or its chunks announce. A response that
/// announces neither ends only with its connection.
fn response_complete(response: &[u8]) -> bool {
    let Some(end) = find(response, b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&response[..end]);
    let body = &response[end + 4..];
    if let Some(length) = header(&head, "content-length") {
        return length
            .parse::<usize>()
            .is_ok_and(|length| body.len() >= length);
    }
    if header(&head, "transfer-encoding")
        .is_some_and(|coding| coding.eq_ignore_ascii_case("chunked"))
    {
        return chunks_complete(body);
    }
    false
}

/// Whether a chunked body has come up to its last (empty) chunk.
fn chunks_complete(mut rest: &[u8]) -> bool {
    loop {
        let Some(line_end) = find(rest, b"\r\n") else {
            return false;
        };
        let line = String::from_utf8_lossy(&rest[..line_end]);
        let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
        else {
            return false;
        };
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers, if any, then an empty line.
            return find(rest, b"\r\n").is_some();
        }
        if rest.len() < size + 2 {
            return false;
        }
        rest = &rest[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The value of header `name` (any case, with or without blanks around the
/// colon, as chromedriver writes them) in a response head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then_some(value.trim())
    })
}

fn json_response(response: &[u8]) -> Result<(u16, serde_json::Value), String> {
    let response = std::str::from_utf8(response).map_err(|err| err.to_string())?;
    if !response.contains("\r\n\r\n") {
        return Err(format!("incomplete response: {response:?}"));
    }
    let (status, body) = parse_response(response);
    if body.trim().is_empty() {
        return Ok((status, serde_json::Value::Null));
    }
    let body = serde_json::from_str(&body)
        .map_err(|err| format!("status {status}, body is not JSON ({err}): {body:?}"))?;
    Ok((status, body))
}

/// Status and body of a whole HTTP/1.1 response, its body dechunked when
/// it came in chunks.
fn parse_response(response: &str) -> (u16, String) {
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let chunked = header(head, "transfer-encoding")
        .is_some_and(|coding| coding.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

/// The body of a `Transfer-Encoding: chunked` response.
fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return body;
        }
        body.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").expect("chunk end");
    }
}

/// The value of one exact series (`name{labels}`) in a metrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A loopback port nothing listens on (at the time of asking), taken from
/// below the kernel's ephemeral range: the ports the kernel hands out by
/// itself, to outgoing connections among others, never collide with it,
/// not even while a test has stopped its server for an outage.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    if ephemeral_low < 10_000 {
        // No room below it: let the kernel pick.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let span = 8_000;
    let base = ephemeral_low - span;
    // Test binaries run one after the other; each starts elsewhere.
    let start = std::process::id() % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(base + offset).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {base}..{ephemeral_low}");
}
