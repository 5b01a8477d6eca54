//! A Server-Sent Events client over reqwest, for change-stream tests.

use std::time::Duration;

use tokio::time::error::Elapsed;

use serde_json::Value;

/// Longest a test waits for the next frame before it fails.
const FRAME_DEADLINE: Duration = Duration::from_secs(30);

/// One frame of a stream: an event, or a `:` comment.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Event(Event),
    Comment(String),
}

/// One event as the server sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Option<u64>,
    pub event: String,
    pub data: Value,
}

impl Event {
    pub fn key(&self) -> &str {
        self.data["key"].as_str().unwrap_or_default()
    }

    pub fn revision(&self) -> u64 {
        self.data["revision"].as_u64().expect("a revision")
    }
}

/// An open change stream.
pub struct Stream {
    resp: reqwest::Response,
    buf: Vec<u8>,
    ended: bool,
}

impl Stream {
    /// Opens `url` (a watch URL), asserting a 200 event stream.
    pub async fn open(client: &reqwest::Client, url: &str, last_event_id: Option<u64>) -> Stream {
        match Self::try_open(client, url, last_event_id).await {
            Ok(s) => s,
            Err(status) => panic!("watch {url}: {status}"),
        }
    }

    /// Opens `url`; the status when it is not 200.
    pub async fn try_open(
        client: &reqwest::Client,
        url: &str,
        last_event_id: Option<u64>,
    ) -> Result<Stream, u16> {
        let mut req = client.get(url);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = req.send().await.expect("watch request");
        if resp.status() != 200 {
            return Err(resp.status().as_u16());
        }
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Ok(Stream {
            resp,
            buf: Vec::new(),
            ended: false,
        })
    }

    /// The next frame; `None` once the stream has ended (cleanly or not).
    pub async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 2).collect();
                return Some(parse(&String::from_utf8(raw).expect("UTF-8 frame")));
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout(FRAME_DEADLINE, self.resp.chunk())
                .await
                .expect("a frame within the deadline")
            {
                Ok(Some(bytes)) => self.buf.extend_from_slice(&bytes),
                Ok(None) | Err(_) => self.ended = true,
            }
        }
    }

    /// The next event, skipping comments; `None` at the end. Heartbeat
    /// comments do not extend the deadline: an event that never comes
    /// fails the test instead of keeping it waiting.
    pub async fn event(&mut self) -> Option<Event> {
        self.event_within(FRAME_DEADLINE)
            .await
            .expect("an event within the deadline (only comments came)")
    }

    async fn event_within(&mut self, limit: Duration) -> Result<Option<Event>, Elapsed> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.frame()).await? {
                Some(Frame::Event(e)) => return Ok(Some(e)),
                Some(Frame::Comment(_)) => {}
                None => return Ok(None),
            }
        }
    }

    /// The next `n` events, failing if the stream ends first or an event
    /// does not come within the deadline.
    pub async fn events(&mut self, n: usize) -> Vec<Event> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.event_within(FRAME_DEADLINE).await {
                Ok(Some(e)) => out.push(e),
                Ok(None) => panic!(
                    "the stream ended after {} of {n} events: {out:?}",
                    out.len()
                ),
                Err(_) => panic!("no event came after {} of {n}: {out:?}", out.len()),
            }
        }
        out
    }
}

fn parse(text: &str) -> Frame {
    let mut id = None;
    let mut event = String::from("message");
    let mut data = String::new();
    let mut comment = None;
    for line in text.lines() {
        if let Some(c) = line.strip_prefix(':') {
            comment = Some(c.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("id: ") {
            id = Some(v.parse().expect("a numeric id"));
        } else if let Some(v) = line.strip_prefix("event: ") {
            event = v.to_owned();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push_str(v);
        } else if !line.is_empty() {
            panic!("unexpected line in a frame: {line:?}");
        }
    }
    match comment {
        Some(c) if data.is_empty() => Frame::Comment(c),
        _ => Frame::Event(Event {
            id,
            event,
            data: serde_json::from_str(&data).expect("JSON data"),
        }),
    }
}
