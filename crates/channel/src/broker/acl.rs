//! Logins and topic ACLs of the embedded broker, enforced in its relay.
//!
//! When the broker admits only logins (`BrokerOptions::auth`), the relay reads what each
//! client sends (MQTT 3.1.1, the only version the broker speaks) packet by packet:
//!
//! - the first packet is a CONNECT with a username and password, read within 10 s; the relay
//!   asks the check ([`super::BrokerAuth`]) itself and answers a refused login with CONNACK
//!   "not authorized". An admitted CONNECT goes on to rumqttd with its password replaced by
//!   the relay's own secret, the only password rumqttd accepts: a client that reaches
//!   rumqttd's internal loopback port directly, even with a valid login, is refused, so
//!   nothing bypasses these rules.
//! - rumqttd has no topic ACLs, so the relay keeps a task inside its job, as the provisioned
//!   Mosquitto's ACLs do (`fledge_control::mosquitto`). A login is `<job id>/<task id>`;
//!   SUBSCRIBE filters start with `fledge/<job>/` (so no `#`, `+` or other job); PUBLISH topics
//!   (and the CONNECT's last will) are `fledge/<job>/<channel>/<group>/` followed by
//!   `data/<end>`, `bcast/<role>` or `presence/<role>/<task>` with the task's **own** id; a
//!   second CONNECT is refused.
//!
//! A client that breaks a rule is disconnected at once (nothing of the offending packet
//! reaches rumqttd) and the refusal is logged with its login. Only packet headers, topics and
//! filters are read: a PUBLISH's payload is streamed through without being buffered.

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite};
use tokio::io::{AsyncWriteExt as _, BufReader};

use crate::mqtt::{job_topic_prefix, topic_segment};

/// Largest CONNECT or SUBSCRIBE read whole, in bytes (ours are well under 1 KiB).
const MAX_CONTROL_PACKET: usize = 64 << 10;

/// What one login may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Acl {
    /// `fledge/<job>/`, escaped as ends write it.
    prefix: String,
    /// The task's id as a topic segment.
    me: String,
    /// The login, for logs.
    login: String,
}

impl Acl {
    /// The rules of login `username` (`<job id>/<task id>`), or why it has none.
    pub(crate) fn of_login(username: &str) -> Result<Acl, String> {
        let (job, task) = username
            .split_once('/')
            .filter(|(job, task)| !job.is_empty() && !task.is_empty() && !task.contains('/'))
            .ok_or_else(|| format!("login {username:?} is not <job id>/<task id>"))?;
        Ok(Acl {
            prefix: format!("{}/", job_topic_prefix(job)),
            me: topic_segment(task),
            login: username.to_owned(),
        })
    }

    /// Why this login may not subscribe to `filter`, if it may not.
    pub(crate) fn check_subscribe(&self, filter: &str) -> Result<(), String> {
        if filter.starts_with(&self.prefix) {
            Ok(())
        } else {
            Err(format!("subscribe to {filter:?} outside {}#", self.prefix))
        }
    }

    /// Why this login may not publish on `topic`, if it may not.
    pub(crate) fn check_publish(&self, topic: &str) -> Result<(), String> {
        let refuse = |why: &str| Err(format!("publish on {topic:?}: {why}"));
        let Some(rest) = topic.strip_prefix(&self.prefix) else {
            return refuse(&format!("outside {}", self.prefix));
        };
        if topic.contains(['+', '#']) {
            return refuse("wildcards in a topic name");
        }
        let levels: Vec<&str> = rest.split('/').collect();
        if levels.iter().any(|l| l.is_empty()) {
            return refuse("an empty level");
        }
        match levels[..] {
            [_, _, "data" | "bcast", _] => Ok(()),
            [_, _, "presence", _, end] if end == self.me => Ok(()),
            [_, _, "presence", _, _] => refuse("another end's presence"),
            _ => refuse("not a data, broadcast or presence topic"),
        }
    }
}

/// A protocol violation or refused packet: the connection is closed.
fn refused(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, why.into())
}

/// Reads an MQTT remaining length (1 to 4 bytes); returns it and its bytes.
async fn read_remaining_length<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<(usize, Vec<u8>)> {
    let mut value = 0usize;
    let mut bytes = Vec::with_capacity(4);
    for i in 0..4 {
        let byte = r.read_u8().await?;
        bytes.push(byte);
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((value, bytes));
        }
    }
    Err(refused("a remaining length longer than 4 bytes"))
}

/// A cursor over a packet body that names what is missing.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, n: usize, what: &str) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(refused(format!("a truncated {what}")));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> io::Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> io::Result<usize> {
        let b = self.take(2, what)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A length-prefixed field.
    fn field(&mut self, what: &str) -> io::Result<&'a [u8]> {
        let n = self.u16(what)?;
        self.take(n, what)
    }

    fn string(&mut self, what: &str) -> io::Result<&'a str> {
        std::str::from_utf8(self.field(what)?)
            .map_err(|_| refused(format!("a {what} that is not UTF-8")))
    }
}

/// A client's CONNECT (MQTT 3.1.1), checked for its form.
#[derive(Debug)]
pub(crate) struct Connect {
    /// The body up to the password field.
    head: Vec<u8>,
    /// The username.
    pub(crate) username: String,
    /// The password.
    pub(crate) password: String,
    /// The last will's topic, if it sets one.
    will: Option<String>,
}

impl Connect {
    /// The packet with `password` in place of the client's.
    pub(crate) fn with_password(&self, password: &str) -> Vec<u8> {
        let mut body = self.head.clone();
        body.extend_from_slice(&u16::try_from(password.len()).unwrap_or(0).to_be_bytes());
        body.extend_from_slice(password.as_bytes());
        let mut packet = vec![0x10];
        let mut n = body.len();
        loop {
            let byte = (n % 128) as u8;
            n /= 128;
            packet.push(if n > 0 { byte | 0x80 } else { byte });
            if n == 0 {
                break;
            }
        }
        packet.extend_from_slice(&body);
        packet
    }
}

/// Parses a CONNECT body (MQTT 3.1.1, with a username and a password last).
fn parse_connect(body: &[u8]) -> io::Result<Connect> {
    let mut b = Body(body);
    if b.field("protocol name")? != b"MQTT" || b.u8("protocol level")? != 4 {
        return Err(refused("not an MQTT 3.1.1 CONNECT"));
    }
    let flags = b.u8("connect flags")?;
    b.take(2, "keep-alive")?;
    b.field("client id")?;
    let will = if flags & 0x04 != 0 {
        let topic = b.string("will topic")?.to_owned();
        b.field("will message")?;
        Some(topic)
    } else {
        None
    };
    if flags & 0xc0 != 0xc0 {
        return Err(refused("a CONNECT without a username and password"));
    }
    let username = b.string("username")?.to_owned();
    let head = body[..body.len() - b.0.len()].to_vec();
    let password = b.string("password")?.to_owned();
    if !b.0.is_empty() {
        return Err(refused("bytes after the CONNECT's password"));
    }
    Ok(Connect { head, username, password, will })
}

/// Reads a client's first packet, which must be a CONNECT, and the ACL of its login (its
/// will checked against it). The credentials are not checked here.
pub(crate) async fn read_connect<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
) -> io::Result<(Connect, Acl)> {
    let first = r.read_u8().await?;
    let (remaining, _) = read_remaining_length(r).await?;
    if first != 0x10 {
        return Err(refused("a packet before CONNECT"));
    }
    let body = read_whole(r, remaining, "CONNECT").await?;
    let connect = parse_connect(&body)?;
    let rules = Acl::of_login(&connect.username).map_err(refused)?;
    if let Some(topic) = &connect.will {
        rules.check_publish(topic).map_err(|why| refused(format!("last will: {why}")))?;
    }
    Ok((connect, rules))
}

/// The topic filters of a SUBSCRIBE body (MQTT 3.1.1).
fn parse_subscribe(body: &[u8]) -> io::Result<Vec<String>> {
    let mut b = Body(body);
    b.take(2, "packet id")?;
    let mut filters = Vec::new();
    while !b.0.is_empty() {
        filters.push(b.string("topic filter")?.to_owned());
        b.u8("requested QoS")?;
    }
    if filters.is_empty() {
        return Err(refused("a SUBSCRIBE without a filter"));
    }
    Ok(filters)
}

/// Forwards what a client sends after its CONNECT to the broker, packet by packet, enforcing
/// `rules`; returns when the client closes, or fails (and the caller drops the connection) on
/// the first packet the rules refuse.
pub(crate) async fn forward<R, W>(
    r: &mut BufReader<R>,
    mut broker: W,
    rules: &Acl,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    forward_packets(r, &mut broker, rules).await.map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            refused(format!("login {}: {e}", rules.login))
        } else {
            e
        }
    })
}

async fn forward_packets<R, W>(r: &mut BufReader<R>, broker: &mut W, rules: &Acl) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        // Flush what is pending before waiting for the client.
        if r.buffer().is_empty() {
            broker.flush().await?;
        }
        if r.fill_buf().await?.is_empty() {
            return Ok(());
        }
        let first = r.read_u8().await?;
        let (remaining, length_bytes) = read_remaining_length(r).await?;
        let kind = first >> 4;
        let mut head = Vec::with_capacity(8);
        head.push(first);
        head.extend_from_slice(&length_bytes);
        match kind {
            1 => return Err(refused("a second CONNECT")),
            3 => {
                // The topic, then the rest (packet id, payload) streamed through.
                let mut len = [0u8; 2];
                r.read_exact(&mut len).await?;
                let n = usize::from(u16::from_be_bytes(len));
                if 2 + n > remaining {
                    return Err(refused("a PUBLISH whose topic overruns it"));
                }
                let mut topic = vec![0u8; n];
                r.read_exact(&mut topic).await?;
                let name = std::str::from_utf8(&topic)
                    .map_err(|_| refused("a PUBLISH topic that is not UTF-8"))?;
                rules.check_publish(name).map_err(refused)?;
                broker.write_all(&head).await?;
                broker.write_all(&len).await?;
                broker.write_all(&topic).await?;
                copy_exact(r, broker, remaining - 2 - n).await?;
            }
            8 => {
                let body = read_whole(r, remaining, "SUBSCRIBE").await?;
                for filter in parse_subscribe(&body)? {
                    rules.check_subscribe(&filter).map_err(refused)?;
                }
                broker.write_all(&head).await?;
                broker.write_all(&body).await?;
            }
            _ => {
                broker.write_all(&head).await?;
                copy_exact(r, broker, remaining).await?;
            }
        }
    }
}

async fn read_whole<R: AsyncRead + Unpin>(
    r: &mut R,
    remaining: usize,
    what: &str,
) -> io::Result<Vec<u8>> {
    if remaining > MAX_CONTROL_PACKET {
        return Err(refused(format!(
            "a {what} of {remaining} bytes (at most {MAX_CONTROL_PACKET})"
        )));
    }
    let mut body = vec![0u8; remaining];
    r.read_exact(&mut body).await?;
    Ok(body)
}

/// Copies exactly `n` bytes from `r` to `w` (an early end of `r` is an error).
async fn copy_exact<R, W>(r: &mut R, w: &mut W, n: usize) -> io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let copied = tokio::io::copy_buf(&mut r.take(n as u64), w).await?;
    if copied as usize != n {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the client closed mid-packet"));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn acl() -> Acl {
        Acl::of_login("j1/t1").unwrap()
    }

    #[test]
    fn a_login_is_kept_inside_its_job_and_its_own_presence() {
        let acl = acl();
        for ok in ["fledge/j1/#", "fledge/j1/param/default/presence/aggregator/+"] {
            acl.check_subscribe(ok).unwrap();
        }
        for bad in ["#", "fledge/#", "fledge/+/param/#", "fledge/j2/#", "fledge/j1", "$SYS/#"] {
            assert!(acl.check_subscribe(bad).is_err(), "{bad}");
        }
        for ok in [
            "fledge/j1/param/default/data/agg",
            "fledge/j1/param/default/bcast/trainer",
            "fledge/j1/param/default/presence/trainer/t1",
        ] {
            acl.check_publish(ok).unwrap();
        }
        for (bad, why) in [
            ("fledge/j2/param/default/data/agg", "outside fledge/j1/"),
            ("fledge/j1/param/default/presence/trainer/t2", "another end's presence"),
            ("fledge/j1/param/default/data/agg/extra", "not a data"),
            ("fledge/j1/param/default/data/+", "wildcards"),
            ("fledge/j1/param//data/agg", "an empty level"),
            ("fledge/j1/param/default/other/x", "not a data"),
            ("fledge/j10/param/default/data/agg", "outside fledge/j1/"),
        ] {
            let err = acl.check_publish(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        // Ids are escaped as ends write them, so an id cannot reach another level.
        let odd = Acl::of_login("j/1/t1");
        assert!(odd.is_err(), "{odd:?}");
        let escaped = Acl::of_login("j+1/t#1").unwrap();
        escaped.check_publish("fledge/j%2B1/c/g/presence/r/t%231").unwrap();
        assert!(Acl::of_login("nojob").is_err() && Acl::of_login("/t").is_err());
    }

    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        out.extend_from_slice(bytes);
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        let mut n = body.len();
        loop {
            let mut byte = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(body);
        out
    }

    fn connect(username: Option<&str>, will: Option<&str>) -> Vec<u8> {
        connect_with(username, will, "secret")
    }

    fn connect_with(username: Option<&str>, will: Option<&str>, password: &str) -> Vec<u8> {
        let mut body = Vec::new();
        field(&mut body, b"MQTT");
        let mut flags = 0x02;
        if will.is_some() {
            flags |= 0x04;
        }
        if username.is_some() {
            flags |= 0xc0;
        }
        body.extend_from_slice(&[4, flags, 0, 10]);
        field(&mut body, b"client");
        if let Some(topic) = will {
            field(&mut body, topic.as_bytes());
            field(&mut body, b"");
        }
        if let Some(user) = username {
            field(&mut body, user.as_bytes());
            field(&mut body, password.as_bytes());
        }
        packet(0x10, &body)
    }

    fn publish(topic: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        field(&mut body, topic.as_bytes());
        body.extend_from_slice(&[0, 1]);
        body.extend_from_slice(payload);
        packet(0x32, &body)
    }

    fn subscribe(filters: &[&str]) -> Vec<u8> {
        let mut body = vec![0, 7];
        for f in filters {
            field(&mut body, f.as_bytes());
            body.push(1);
        }
        packet(0x82, &body)
    }

    /// What the relay passes on of `input` (its CONNECT with the password `relayed`), and how
    /// it ended.
    async fn run(input: Vec<u8>) -> (Vec<u8>, io::Result<()>) {
        let mut r = BufReader::new(&input[..]);
        let (connect, rules) = match read_connect(&mut r).await {
            Ok(found) => found,
            Err(e) => return (Vec::new(), Err(e)),
        };
        assert_eq!(connect.password, "secret");
        let mut out = connect.with_password("relayed");
        let res = forward(&mut r, &mut out, &rules).await;
        (out, res)
    }

    #[tokio::test]
    async fn allowed_packets_pass_through_byte_for_byte_with_the_relay_password() {
        let big = vec![7u8; 300_000];
        let will = Some("fledge/j1/p/g/presence/trainer/t1");
        let hello = connect(Some("j1/t1"), will);
        let rest = [
            subscribe(&["fledge/j1/#"]),
            publish("fledge/j1/p/g/data/agg", &big),
            publish("fledge/j1/p/g/presence/trainer/t1", b"{}"),
            vec![0xc0, 0x00], // PINGREQ
            vec![0xe0, 0x00], // DISCONNECT
        ]
        .concat();
        let (out, res) = run([hello.clone(), rest.clone()].concat()).await;
        res.unwrap();
        // The CONNECT is the client's but for the password; the rest is as the client sent it.
        let expected = [connect_with(Some("j1/t1"), will, "relayed"), rest].concat();
        assert!(out == expected, "forwarded bytes differ from the client's");
    }

    #[tokio::test]
    async fn a_refused_packet_closes_the_connection_before_it_is_forwarded() {
        let hello = connect(Some("j1/t1"), None);
        let relayed = run(hello.clone()).await.0;
        for (bad, why) in [
            (subscribe(&["fledge/j1/#", "#"]), "subscribe to \"#\""),
            (publish("fledge/j2/p/g/data/agg", b"x"), "outside fledge/j1/"),
            (publish("fledge/j1/p/g/presence/trainer/t2", b""), "another end's presence"),
            (connect(Some("j1/t1"), None), "a second CONNECT"),
        ] {
            let (out, res) = run([hello.clone(), bad].concat()).await;
            let err = res.unwrap_err().to_string();
            assert!(err.contains(why) && err.contains("login j1/t1"), "{why}: {err}");
            assert!(out == relayed, "only the CONNECT went through before {why}");
        }
        for (input, why) in [
            (publish("fledge/j1/p/g/data/agg", b"x"), "a packet before CONNECT"),
            (connect(None, None), "without a username and password"),
            (connect(Some("j1/t1"), Some("fledge/j1/p/g/presence/trainer/t2")), "last will"),
            (connect(Some("t1"), None), "not <job id>/<task id>"),
            (vec![0x10, 0xff, 0xff, 0xff, 0xff], "longer than 4 bytes"),
            (packet(0x10, &[0, 4, b'M']), "truncated"),
            (packet(0x10, &vec![0; MAX_CONTROL_PACKET + 1]), "at most"),
        ] {
            let (out, res) = run(input).await;
            let err = res.unwrap_err().to_string();
            assert!(err.contains(why), "{why}: {err}");
            assert!(out.is_empty(), "nothing went through for {why}");
        }
        // A client that hangs up mid-payload is an error too, not a short packet forwarded.
        let mut cut = [hello.clone(), publish("fledge/j1/p/g/data/agg", &[1; 100])].concat();
        cut.truncate(cut.len() - 10);
        let (_, res) = run(cut).await;
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
