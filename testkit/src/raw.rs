//! A websocket opened and read by hand, for tests that must send what no client library
//! would, or see each frame as the server sent it (a client library joins a message's
//! frames).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connects to `addr`, sends the handshake for `path` and reads the answer, which must
/// be 101.
pub async fn websocket(addr: SocketAddr, path: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    tcp
}

/// The server's next (unmasked) frame: its first byte (FIN and opcode) and its payload.
pub async fn frame(tcp: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    tcp.read_exact(&mut head).await.unwrap();
    let len = match head[1] & 0x7f {
        126 => u64::from(tcp.read_u16().await.unwrap()),
        127 => tcp.read_u64().await.unwrap(),
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).unwrap()];
    tcp.read_exact(&mut payload).await.unwrap();
    (head[0], payload)
}
