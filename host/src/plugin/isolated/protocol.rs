//! What the host and a worker process say to each other, and how: length-delimited frames
//! (tokio-util's codec, used synchronously) each holding one postcard message.
//!
//! The host leads and the worker answers, one request at a time: `Start` first, then `Handle`,
//! `CommandStream` or `Stop`. While it handles a batch the worker may ask for host services
//! (`Call`), and waits for the host's `Reply` before it goes on. `Log` frames come whenever the plugin
//! logs and need no answer. Messages borrow their strings and bytes from the frame they were read from.

use std::io::{self, Read, Write};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::plugin::Delivery;

/// The largest frame either side accepts: a longer length prefix means a broken stream, not a message.
const MAX_FRAME: usize = 256 << 20;

/// How much is read from the pipe at a time.
const CHUNK: usize = 16 << 10;

/// Host to worker.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum ToWorker<'a> {
    #[serde(borrow)]
    Start(Start<'a>),
    Handle {
        handler: &'a str,
        #[serde(borrow)]
        batch: Vec<Message<'a>>,
    },
    CommandStream {
        message_type: &'a str,
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
    },
    Reply(Reply),
    Stop,
}

/// What the worker loads, and the limits it sets on itself before loading it.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Start<'a> {
    /// The library the user named (for messages), as bytes: a path need not be UTF-8.
    #[serde(with = "serde_bytes")]
    pub(super) library: &'a [u8],
    /// The private copy the host made of it, which the worker maps.
    #[serde(with = "serde_bytes")]
    pub(super) copy: &'a [u8],
    pub(super) build_id: &'a str,
    #[serde(borrow)]
    pub(super) instance: Option<&'a str>,
    pub(super) log_level: u8,
    pub(super) memory_limit_mb: Option<u64>,
    pub(super) cpu_limit_seconds: Option<u64>,
}

/// One message of a batch.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Message<'a> {
    id: &'a str,
    stream: &'a str,
    message_type: &'a str,
    position: u64,
    global_position: u64,
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
    #[serde(with = "serde_bytes")]
    metadata: &'a [u8],
}

impl<'a> From<&Delivery<'a>> for Message<'a> {
    fn from(d: &Delivery<'a>) -> Self {
        Self {
            id: d.id,
            stream: d.stream,
            message_type: d.message_type,
            position: d.position,
            global_position: d.global_position,
            data: d.data,
            metadata: d.metadata,
        }
    }
}

impl<'a> From<&Message<'a>> for Delivery<'a> {
    fn from(m: &Message<'a>) -> Self {
        Self {
            id: m.id,
            stream: m.stream,
            message_type: m.message_type,
            position: m.position,
            global_position: m.global_position,
            data: m.data,
            metadata: m.metadata,
        }
    }
}

/// Worker to host.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum FromWorker<'a> {
    /// The domain is loaded: the instance chosen and its handlers.
    Ready {
        instance: &'a str,
        registrations: Vec<Registration>,
    },
    /// The domain could not be loaded: why, in one line.
    Failed(&'a str),
    Log {
        level: u8,
        module: &'a str,
        message: &'a str,
    },
    #[serde(borrow)]
    Call(Call<'a>),
    Done {
        handled: u32,
        #[serde(borrow)]
        failure: Option<Failure<'a>>,
    },
    #[serde(borrow)]
    Stream(Result<&'a str, &'a str>),
}

/// A handler registration; options travel as the JSON the plugin declared them in.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Registration {
    pub(super) name: String,
    pub(super) kind: u8,
    pub(super) categories: Vec<String>,
    pub(super) message_types: Vec<String>,
    pub(super) options_json: String,
}

/// How a batch failed, as the plugin said.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Failure<'a> {
    pub(super) retryable: bool,
    pub(super) message: &'a str,
}

/// A host service the handler asks for during a batch (see `HostServices`).
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Call<'a> {
    RaiseEvent {
        index: u32,
        stream: &'a str,
        message_type: &'a str,
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
        expected_version: Option<i64>,
    },
    SendCommand {
        index: u32,
        stream: &'a str,
        message_type: &'a str,
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
    },
    ReadStream {
        stream: &'a str,
        from_position: u64,
    },
    GetDocument {
        collection: &'a str,
        id: &'a str,
    },
    PutDocument {
        index: u32,
        collection: &'a str,
        id: &'a str,
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
    },
    DeleteDocument {
        index: u32,
        collection: &'a str,
        id: &'a str,
    },
    FindDocuments {
        collection: &'a str,
        field: &'a str,
        #[serde(with = "serde_bytes")]
        value_json: &'a [u8],
    },
    Schedule {
        index: u32,
        key: &'a str,
        due_ms: i64,
        command: bool,
        stream: &'a str,
        message_type: &'a str,
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
    },
    CancelSchedule {
        index: u32,
        key: &'a str,
    },
    NowMs,
}

/// The host's answer to a [`Call`].
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Reply {
    Unit(Result<(), String>),
    Bytes(Result<ByteBuf, String>),
    Document(Result<Option<ByteBuf>, String>),
    Millis(i64),
}

/// Decode one message from a frame.
pub(super) fn decode<'a, T: Deserialize<'a>>(frame: &'a [u8]) -> io::Result<T> {
    postcard::from_bytes(frame).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// Reads frames from a byte stream.
pub(super) struct FrameReader<R> {
    source: R,
    codec: LengthDelimitedCodec,
    buffer: BytesMut,
    /// Bytes read since the last whole frame (the codec takes a frame's header out of the buffer
    /// before its payload arrives, so an empty buffer does not mean "between frames").
    pending: usize,
}

impl<R: Read> FrameReader<R> {
    pub(super) fn new(source: R) -> Self {
        Self {
            source,
            codec: codec(),
            buffer: BytesMut::new(),
            pending: 0,
        }
    }

    pub(super) fn source_mut(&mut self) -> &mut R {
        &mut self.source
    }

    /// The next frame; `None` when the stream ended between two frames.
    pub(super) fn next(&mut self) -> io::Result<Option<BytesMut>> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buffer)? {
                self.pending = self.buffer.len();
                return Ok(Some(frame));
            }
            let start = self.buffer.len();
            self.buffer.resize(start + CHUNK, 0);
            let read = self.source.read(&mut self.buffer[start..]);
            self.buffer.truncate(start + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) if self.pending == 0 => return Ok(None),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.pending += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Writes frames to a byte stream.
pub(super) struct FrameWriter<W> {
    sink: W,
    codec: LengthDelimitedCodec,
    buffer: BytesMut,
}

impl<W: Write> FrameWriter<W> {
    pub(super) fn new(sink: W) -> Self {
        Self {
            sink,
            codec: codec(),
            buffer: BytesMut::new(),
        }
    }

    /// Send `message` as one frame.
    pub(super) fn send(&mut self, message: &impl Serialize) -> io::Result<()> {
        let payload = postcard::to_allocvec(message).map_err(io::Error::other)?;
        self.buffer.clear();
        self.codec.encode(Bytes::from(payload), &mut self.buffer)?;
        self.sink.write_all(&self.buffer)?;
        self.sink.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_borrowed_messages_across_a_byte_stream() {
        let mut writer = FrameWriter::new(Vec::new());
        let delivery = Delivery {
            id: "m-1",
            stream: "probe::probe-1",
            message_type: "Probe.Run.v1",
            position: 3,
            global_position: 42,
            data: br#"{"id":"1"}"#,
            metadata: b"{}",
        };
        writer
            .send(&ToWorker::Handle {
                handler: "runner",
                batch: vec![Message::from(&delivery)],
            })
            .unwrap();
        writer.send(&ToWorker::Stop).unwrap();
        let mut reader = FrameReader::new(writer.sink.as_slice());
        let frame = reader.next().unwrap().unwrap();
        match decode(&frame).unwrap() {
            ToWorker::Handle { handler, batch } => {
                assert_eq!(handler, "runner");
                let back = Delivery::from(&batch[0]);
                assert_eq!((back.id, back.global_position), ("m-1", 42));
                assert_eq!(back.data, delivery.data);
            }
            other => panic!("expected a batch, got {other:?}"),
        }
        let frame = reader.next().unwrap().unwrap();
        assert!(matches!(decode(&frame).unwrap(), ToWorker::Stop));
        assert!(reader.next().unwrap().is_none(), "the stream ended");
    }

    #[test]
    fn a_stream_cut_inside_a_frame_is_an_error_not_an_end() {
        let mut writer = FrameWriter::new(Vec::new());
        writer.send(&ToWorker::Stop).unwrap();
        let cut = &writer.sink[..writer.sink.len() - 1];
        let error = FrameReader::new(cut).next().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_length_past_the_limit_is_refused() {
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let error = FrameReader::new(&huge[..]).next().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }
}
