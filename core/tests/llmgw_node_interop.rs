//! `format::llmgw` against Node: the reference implementation in
//! `tests/interop/llmgw_gateway.mjs` (node:crypto, written the way the gateway writes it) runs
//! as one child process per test binary, driven over its JSON line protocol.
//!
//! Inputs come from a fixed-seed xorshift generator (test data, not cryptography), so every
//! run checks the same cases. Node is required: the test fails loudly without it (set `NODE`
//! to use another binary than the `node` on PATH).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};

use provider_keys_encrypt_core::format::llmgw::{
    self as llmgw, Keyring, LlmgwError, Malformed, Version, IV_LEN,
};
use provider_keys_encrypt_core::format::State;
use provider_keys_encrypt_core::RowContext;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// The Node process

struct Node {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Node {
    fn spawn() -> Node {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/interop/llmgw_gateway.mjs"
        );
        let node = std::env::var("NODE").unwrap_or_else(|_| "node".to_string());
        let mut child = Command::new(&node)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `{node}` ({e}). This test needs Node.js (18 or later): install \
                     it, put it on PATH, or set NODE=/path/to/node"
                )
            });
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Node {
            _child: child,
            stdin,
            stdout,
        }
    }

    fn call(&mut self, request: Value) -> Value {
        let mut line = request.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .expect("the Node process stopped reading requests");
        let mut answer = String::new();
        let n = self
            .stdout
            .read_line(&mut answer)
            .expect("reading Node's answer");
        assert!(n > 0, "the Node process exited (see its stderr above)");
        serde_json::from_str(&answer).expect("Node answered with invalid JSON")
    }

    /// The answer's `field`, or a panic naming the request's op and Node's error code.
    fn ok(&mut self, request: Value, field: &str) -> String {
        let op = request["op"].clone();
        let answer = self.call(request);
        match answer[field].as_str() {
            Some(s) => s.to_string(),
            None => panic!("Node refused op {op}: code {}", answer["code"]),
        }
    }

    fn kids(&mut self, env: &str) -> Vec<String> {
        let answer = self.call(json!({"op": "kids", "secrets": env}));
        let kids = answer["kids"].as_array().expect("kids");
        kids.iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect()
    }

    /// Node seals with the IV it is given, so that every run checks the same tokens.
    fn encrypt(
        &mut self,
        env: &str,
        pt: &str,
        ctx: &RowContext,
        version: &str,
        iv: [u8; IV_LEN],
    ) -> String {
        self.ok(
            json!({"op": "encrypt", "secrets": env, "plaintext": pt, "id": ctx.id,
                   "org": ctx.organization_id, "version": version, "ivHex": hex(&iv)}),
            "token",
        )
    }

    /// Ok(plaintext) or Err(Node's error code).
    fn decrypt(&mut self, env: &str, token: &str, ctx: &RowContext) -> Result<String, String> {
        let answer = self.call(json!({"op": "decrypt", "secrets": env, "token": token,
                                      "id": ctx.id, "org": ctx.organization_id}));
        match answer["plaintext"].as_str() {
            Some(pt) => Ok(pt.to_string()),
            None => Err(answer["code"].as_str().unwrap_or("?").to_string()),
        }
    }
}

/// The one Node process of this test binary (tests take turns).
fn node() -> MutexGuard<'static, Node> {
    static NODE: OnceLock<Mutex<Node>> = OnceLock::new();
    NODE.get_or_init(|| Mutex::new(Node::spawn()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Deterministic test data

/// xorshift64*: reproducible test inputs (not cryptography).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn char_in(&mut self, lo: u32, hi: u32) -> char {
        char::from_u32(lo + self.below((hi - lo + 1) as usize) as u32).unwrap()
    }
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.next() as u8)
    }

    /// One character of a plaintext: mostly ASCII, with Latin, CJK, symbols, non-BMP
    /// (emoji, mathematical letters), separators the format uses, and odd whitespace.
    fn text_char(&mut self) -> char {
        match self.below(20) {
            0..=8 => self.char_in(0x21, 0x7e),
            9 => *self.pick(&[':', '|', '"', '\\', ' ', '\t', '\n', '\u{1}', '\u{7f}']),
            10 => self.char_in(0xc0, 0x17f),
            11 => self.char_in(0x4e00, 0x9fff),
            12 => *self.pick(&[
                '\u{2028}', '\u{feff}', '\u{85}', '\u{a0}', '\u{3000}', '\u{fffd}',
            ]),
            13 => self.char_in(0x2000, 0x2bff),
            14..=16 => self.char_in(0x1f300, 0x1f64f),
            17 => self.char_in(0x1d400, 0x1d4ff),
            18 => self.char_in(0x10000, 0x1007f),
            _ => self.char_in(0xe000, 0xffef),
        }
    }

    fn text(&mut self, chars: usize) -> String {
        (0..chars).map(|_| self.text_char()).collect()
    }

    /// Text of 1 to `max` characters.
    fn short_text(&mut self, max: usize) -> String {
        let n = 1 + self.below(max);
        self.text(n)
    }

    /// A plaintext for token tests: empty, API-key-like, unicode, or 10 KB.
    fn plaintext(&mut self, i: usize) -> String {
        match i % 50 {
            0 => String::new(),
            1 => {
                let s = self.text(4000);
                let mut s = s.repeat(10_240 / s.len() + 1);
                while s.len() > 10_240 {
                    s.pop();
                }
                s
            }
            2..=20 => {
                let n = 20 + self.below(80);
                let body: String = (0..n).map(|_| self.char_in(0x21, 0x7e)).collect();
                format!(
                    "{}{body}",
                    self.pick(&["sk-", "sk-proj-", "sk-ant-api03-", "AIza", ""])
                )
            }
            _ => {
                let n = self.below(60);
                self.text(n)
            }
        }
    }

    /// A secret: arbitrary text, no comma, nothing JavaScript's trim() would remove at its ends.
    fn secret(&mut self) -> String {
        loop {
            let s = match self.below(4) {
                0 => (0..16 + self.below(48))
                    .map(|_| self.char_in(0x21, 0x7e))
                    .collect::<String>(),
                1 => self.short_text(30),
                2 => format!("secret {} with spaces", self.next()),
                _ => format!("{}\u{85}", self.short_text(8)),
            };
            let s = s.replace(',', ";");
            if s.trim_matches(is_js_space) == s && !s.is_empty() {
                return s;
            }
        }
    }

    /// JavaScript whitespace to pad a keyring entry with (empty most of the time).
    fn padding(&mut self) -> &'static str {
        const PADDING: [&str; 11] = [
            "",
            "",
            "",
            " ",
            "  ",
            "\t",
            "\n",
            "\u{3000}",
            "\u{feff}",
            "\u{a0}",
            " \u{2028}",
        ];
        PADDING[self.below(PADDING.len())]
    }

    /// A GATEWAY_API_KEY_HASH_SECRET value holding `secrets`, in order, padded with
    /// whitespace and sprinkled with empty entries.
    fn env(&mut self, secrets: &[&str]) -> String {
        let mut parts = Vec::new();
        for s in secrets {
            if self.chance(10) {
                parts.push(self.padding().to_string());
            }
            parts.push(format!("{}{s}{}", self.padding(), self.padding()));
        }
        if self.chance(10) {
            parts.push(String::new());
        }
        parts.join(",")
    }

    fn row(&mut self) -> (String, Option<String>) {
        let id = format!("{:016x}-{:04x}", self.next(), self.below(65536));
        let org = match self.below(10) {
            0..=2 => None,
            3 => Some(String::new()),
            4 => Some(self.short_text(12)),
            _ => Some(format!("org_{:x}", self.next())),
        };
        (id, org)
    }
}

fn is_js_space(c: char) -> bool {
    matches!(
        c,
        '\t' | '\n' | '\u{0B}' | '\u{0C}' | '\r' | ' ' | '\u{A0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200A}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202F}'
                | '\u{205F}'
                | '\u{3000}'
                | '\u{FEFF}'
    )
}

fn ctx<'a>(row: &'a (String, Option<String>)) -> RowContext<'a> {
    RowContext {
        id: &row.0,
        organization_id: row.1.as_deref(),
    }
}

/// A pool of distinct secrets, fixed ones first, with the key ids Node computes for them.
fn secret_pool(rng: &mut Rng, node: &mut Node) -> Vec<(String, String)> {
    let mut pool: Vec<String> = [
        "Jefe",
        "sécret-ü",
        "🔑 key with spaces",
        "llmgateway-dev-api-key-hash-secret",
    ]
    .map(String::from)
    .to_vec();
    while pool.len() < 24 {
        let s = rng.secret();
        if !pool.contains(&s) {
            pool.push(s);
        }
    }
    pool.into_iter()
        .map(|s| {
            let kid = node.kids(&s).pop().unwrap();
            (s, kid)
        })
        .collect()
}

/// 1–3 distinct secrets of the pool (indices).
fn pick_ring(rng: &mut Rng, pool_len: usize) -> Vec<usize> {
    let mut ring = Vec::new();
    let n = 1 + rng.below(3);
    while ring.len() < n {
        let i = rng.below(pool_len);
        if !ring.contains(&i) {
            ring.push(i);
        }
    }
    ring
}

fn secrets_of<'a>(pool: &'a [(String, String)], ring: &[usize]) -> Vec<&'a str> {
    ring.iter().map(|&i| pool[i].0.as_str()).collect()
}

/// Open, or a panic that names the error (never the plaintext).
fn must_open(ring: &Keyring, token: &str, ctx: &RowContext) -> (String, llmgw::Opened) {
    match llmgw::open(ring, token, ctx) {
        Ok((pt, how)) => (pt.to_string(), how),
        Err(e) => panic!("Rust refused a token Node wrote: {e:?}"),
    }
}

fn must_fail(ring: &Keyring, token: &str, ctx: &RowContext) -> LlmgwError {
    match llmgw::open(ring, token, ctx) {
        Ok(_) => panic!("Rust opened a token it must refuse: {token}"),
        Err(e) => e,
    }
}

fn utf16_len(s: &str) -> usize {
    s.encode_utf16().count()
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn key_ids_and_keyring_parsing_match_node() {
    let mut node = node();
    let mut rng = Rng::new(0x6b1d);
    let mut secrets_compared = 0;
    for i in 0..400 {
        let secrets: Vec<String> = (0..1 + rng.below(5)).map(|_| rng.secret()).collect();
        let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let env = rng.env(&refs);
        let ours: Vec<String> = Keyring::parse(&env)
            .unwrap()
            .entries()
            .iter()
            .map(|s| s.kid().to_string())
            .collect();
        assert_eq!(ours, node.kids(&env), "keyring #{i}");
        assert_eq!(ours.len(), secrets.len());
        secrets_compared += ours.len();
    }
    for blank in ["", ",", " , ,\t", "\u{feff}", "\u{3000},\n"] {
        assert_eq!(Keyring::parse(blank).err(), Some(LlmgwError::MissingSecret));
        let answer = node.call(json!({"op": "kids", "secrets": blank}));
        assert_eq!(answer["code"], "missing", "{blank:?}");
    }
    // U+0085 is whitespace to Rust's trim() but not to JavaScript's
    let nel = Keyring::parse("\u{85}nel\u{85}").unwrap();
    assert_eq!(
        vec![nel.current().kid().to_string()],
        node.kids("\u{85}nel\u{85}")
    );
    assert_ne!(
        nel.current().kid(),
        Keyring::parse("nel").unwrap().current().kid()
    );
    println!("key ids: {secrets_compared} secrets in 400 keyrings agree with Node");
    assert!(secrets_compared >= 1000);
}

#[test]
fn rust_sealed_tokens_open_in_node() {
    let mut node = node();
    let mut rng = Rng::new(0x5ea1);
    let pool = secret_pool(&mut rng, &mut node);
    let (mut total, mut exact, mut rotated, mut managed, mut empty, mut big, mut non_bmp) =
        (0, 0, 0, 0, 0, 0, 0);
    for i in 0..1_500 {
        let ring_ix = pick_ring(&mut rng, pool.len());
        let secrets = secrets_of(&pool, &ring_ix);
        let ring = Keyring::parse(&rng.env(&secrets)).unwrap();
        let writer = if rng.chance(25) {
            rng.below(secrets.len())
        } else {
            0
        };
        let pt = rng.plaintext(i);
        let row = rng.row();
        let ctx = ctx(&row);

        let token = if i % 5 == 0 {
            // deterministic: byte-for-byte the token Node writes with the same IV
            let iv: [u8; IV_LEN] = rng.bytes();
            let ours = llmgw::seal_v2_with_iv(&ring.entries()[writer], &iv, &pt, &ctx).unwrap();
            let writer_env = rng.env(&[secrets[writer]]);
            let theirs = node.ok(
                json!({"op": "encrypt", "secrets": writer_env, "plaintext": pt, "id": ctx.id,
                       "org": ctx.organization_id, "ivHex": hex(&iv)}),
                "token",
            );
            assert_eq!(ours, theirs, "token #{i}");
            exact += 1;
            ours
        } else {
            llmgw::seal_v2(&ring.entries()[writer], &pt, &ctx).unwrap()
        };
        let kid = token.split(':').nth(2).unwrap();
        assert_eq!(kid, pool[ring_ix[writer]].1, "key id of token #{i}");

        // Node opens it under the same keyring, and after a rotation puts a new secret first.
        let mut node_secrets = secrets.clone();
        if rng.chance(30) {
            let newer = pool[rng.below(pool.len())].0.as_str();
            if !node_secrets.contains(&newer) {
                node_secrets.insert(0, newer);
                rotated += 1;
            }
        }
        let opened = node.decrypt(&rng.env(&node_secrets), &token, &ctx);
        assert!(
            opened.as_deref() == Ok(pt.as_str()),
            "Node could not open token #{i}: {:?}",
            opened.err()
        );
        total += 1;
        managed += usize::from(ctx.organization_id.is_none());
        empty += usize::from(pt.is_empty());
        big += usize::from(pt.len() >= 10_000);
        non_bmp += usize::from(pt.chars().any(|c| c.len_utf16() == 2));
    }
    println!(
        "Rust → Node: {total} tokens opened ({exact} byte-identical to Node's, {rotated} after a \
         rotation, {managed} NULL org, {empty} empty, {big} ≥ 10 KB, {non_bmp} with non-BMP)"
    );
    assert!(total >= 1000 && exact >= 200 && rotated >= 100 && managed >= 200);
    assert!(empty >= 20 && big >= 20 && non_bmp >= 300);
}

#[test]
fn node_sealed_tokens_open_in_rust() {
    let mut node = node();
    let mut rng = Rng::new(0xd0de);
    let pool = secret_pool(&mut rng, &mut node);
    let (mut total, mut v1, mut older, mut managed, mut empty, mut big, mut non_bmp) =
        (0, 0, 0, 0, 0, 0, 0);
    for i in 0..1_500 {
        let writer = rng.below(pool.len());
        let version = if i % 3 == 0 { "v1" } else { "v2" };
        let pt = rng.plaintext(i);
        let row = rng.row();
        let ctx = ctx(&row);
        // Node writes under `writer` as its current secret (older secrets behind it)...
        let mut node_ring = pick_ring(&mut rng, pool.len());
        node_ring.retain(|&s| s != writer);
        node_ring.insert(0, writer);
        let node_env = rng.env(&secrets_of(&pool, &node_ring));
        let token = node.encrypt(&node_env, &pt, &ctx, version, rng.bytes());
        assert!(token.starts_with(&format!("llmgw:{version}:")));

        // ...Rust reads it with `writer` somewhere in its keyring, not always first.
        let mut ring_ix = pick_ring(&mut rng, pool.len());
        ring_ix.retain(|&s| s != writer);
        let at = rng.below(ring_ix.len() + 1);
        ring_ix.insert(at, writer);
        let ring = Keyring::parse(&rng.env(&secrets_of(&pool, &ring_ix))).unwrap();

        let (back, how) = must_open(&ring, &token, &ctx);
        assert!(back == pt, "token #{i}: plaintext differs");
        assert_eq!(how.entry, at, "token #{i}: opened under the wrong secret");
        assert_eq!(how.kid.to_string(), pool[writer].1);
        let want_version = if version == "v1" {
            Version::V1
        } else {
            Version::V2
        };
        assert_eq!(how.version, want_version);
        if version == "v2" {
            assert_eq!(token.split(':').nth(2), Some(pool[writer].1.as_str()));
        }
        let want_state = if version == "v2" && at == 0 {
            State::Current
        } else {
            State::Previous
        };
        assert_eq!(llmgw::classify(&ring, &token, &ctx), want_state);
        total += 1;
        v1 += usize::from(version == "v1");
        older += usize::from(at > 0);
        managed += usize::from(ctx.organization_id.is_none());
        empty += usize::from(pt.is_empty());
        big += usize::from(pt.len() >= 10_000);
        non_bmp += usize::from(pt.chars().any(|c| c.len_utf16() == 2));
    }
    println!(
        "Node → Rust: {total} tokens opened ({v1} v1, {older} under an older secret, {managed} \
         NULL org, {empty} empty, {big} ≥ 10 KB, {non_bmp} with non-BMP)"
    );
    assert!(total >= 1000 && v1 >= 300 && older >= 300 && managed >= 200);
    assert!(empty >= 20 && big >= 20 && non_bmp >= 300);
}

#[test]
fn token_hash_and_mask_match_node() {
    let mut node = node();
    let mut rng = Rng::new(0x4a54);
    let pool = secret_pool(&mut rng, &mut node);
    let (mut total, mut short, mut non_bmp, mut cut) = (0, 0, 0, 0);
    for i in 0..12_000 {
        let s: String = match i % 4 {
            // 0–5 UTF-16 units
            0 => {
                let mut s = String::new();
                let n = rng.below(6);
                while utf16_len(&s) < n {
                    let c = rng.text_char();
                    if utf16_len(&s) + c.len_utf16() <= n {
                        s.push(c);
                    }
                }
                s
            }
            // around the 12-unit cut, dense in non-BMP characters
            1 => (0..4 + rng.below(16))
                .map(|_| {
                    if rng.chance(40) {
                        rng.char_in(0x1f300, 0x1f64f)
                    } else {
                        rng.text_char()
                    }
                })
                .collect(),
            2 => {
                let n = rng.below(80);
                rng.text(n)
            }
            _ => rng.plaintext(i),
        };
        let ring_ix = pick_ring(&mut rng, pool.len());
        let env = rng.env(&secrets_of(&pool, &ring_ix));
        let ring = Keyring::parse(&env).unwrap();
        let their_hash = node.ok(
            json!({"op": "hash", "secrets": env, "plaintext": s}),
            "hash",
        );
        assert_eq!(ring.token_hash(&s), their_hash, "token_hash #{i}");
        let their_mask = node.ok(json!({"op": "mask", "plaintext": s}), "mask");
        let ours = llmgw::mask(&s);
        assert_eq!(ours, their_mask, "token_masked #{i}");
        total += 1;
        short += usize::from(utf16_len(&s) <= 5);
        non_bmp += usize::from(s.chars().any(|c| c.len_utf16() == 2));
        cut += usize::from(ours.contains('\u{fffd}') && !s.contains('\u{fffd}'));
    }
    println!(
        "token_hash and token_masked: {total} strings agree with Node ({short} of 0–5 UTF-16 \
         units, {non_bmp} with non-BMP characters, {cut} masks cutting a surrogate pair)"
    );
    assert!(total >= 10_000 && short >= 3000 && non_bmp >= 3000 && cut >= 300);
}

#[test]
fn base64url_decoding_matches_node() {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut node = node();
    let mut rng = Rng::new(0xb64);
    let (mut same, mut refused) = (0, 0);
    for _ in 0..4_000 {
        let n = rng.below(40);
        let text: String = (0..n).map(|_| *rng.pick(ALPHABET) as char).collect();
        match llmgw::decode_base64url(&text) {
            Ok(bytes) => {
                assert_eq!(
                    hex(&bytes),
                    node.ok(json!({"op": "b64decode", "text": text}), "hex")
                );
                same += 1;
            }
            Err(e) => {
                // only a dangling character (length ≡ 1 mod 4) is refused in the alphabet
                assert_eq!(e, LlmgwError::Malformed(Malformed::Base64));
                assert_eq!(n % 4, 1, "{text}");
                refused += 1;
            }
        }
    }
    println!("base64url: {same} strings decode to Node's bytes, {refused} dangling ones refused");
    assert!(same >= 2500 && refused >= 500);
}

#[test]
fn node_tokens_tampered_or_misplaced_are_refused() {
    let mut node = node();
    let mut rng = Rng::new(0x7a3e);
    let pool = secret_pool(&mut rng, &mut node);
    let auth = LlmgwError::DoesNotAuthenticate;
    let mut checks = 0;
    let mut check = |node: &mut Node,
                     ring: &Keyring,
                     env: &str,
                     token: &str,
                     ctx: &RowContext,
                     want: LlmgwError,
                     node_code: &str| {
        assert_eq!(must_fail(ring, token, ctx), want, "{token}");
        assert_eq!(
            node.decrypt(env, token, ctx).err().as_deref(),
            Some(node_code),
            "{token}"
        );
        assert_eq!(llmgw::classify(ring, token, ctx), State::Unverified);
        checks += 1;
    };
    let mut trailing_bit_only = 0;
    let mut junk_node_accepts = 0;
    for i in 0..300 {
        let version = if i % 3 == 0 { "v1" } else { "v2" };
        let ring_ix = pick_ring(&mut rng, pool.len());
        let env = rng.env(&secrets_of(&pool, &ring_ix));
        let ring = Keyring::parse(&env).unwrap();
        let row = rng.row();
        let ctx = ctx(&row);
        let pt = if i % 10 == 0 {
            String::new()
        } else {
            rng.plaintext(i + 2)
        };
        let token = node.encrypt(&env, &pt, &ctx, version, rng.bytes());
        let parts: Vec<&str> = token.split(':').collect();
        let first = if version == "v2" { 3 } else { 2 }; // index of the iv part
        let with = |i: usize, part: &str| {
            let mut p = parts.clone();
            p[i] = part;
            p.join(":")
        };

        // a flipped bit in the iv, the ciphertext or the tag
        for (part, text) in parts.iter().enumerate().skip(first) {
            let mut raw = llmgw::decode_base64url(text).unwrap();
            if raw.is_empty() {
                continue;
            }
            let byte = rng.below(raw.len());
            raw[byte] ^= 1 << rng.below(8);
            let t = with(part, &b64url(&raw));
            check(&mut node, &ring, &env, &t, &ctx, auth, "auth");
        }
        // a changed character: both refuse, or (a change in unused trailing bits) both open
        let part = first + rng.below(3);
        if !parts[part].is_empty() {
            let mut chars: Vec<char> = parts[part].chars().collect();
            let at = rng.below(chars.len());
            let was = chars[at];
            while chars[at] == was {
                chars[at] = rng.char_in(0x41, 0x5a);
            }
            let t = with(part, &chars.into_iter().collect::<String>());
            match node.decrypt(&env, &t, &ctx) {
                Ok(theirs) => {
                    assert!(theirs == pt);
                    assert!(must_open(&ring, &t, &ctx).0 == pt);
                    trailing_bit_only += 1;
                }
                Err(code) => {
                    assert_eq!(code, "auth");
                    assert_eq!(must_fail(&ring, &t, &ctx), auth);
                }
            }
        }
        // copied to another row, another organization, or between NULL and an organization
        let other_id = RowContext {
            id: "another-row",
            ..ctx
        };
        check(&mut node, &ring, &env, &token, &other_id, auth, "auth");
        let other_org = RowContext {
            organization_id: match ctx.organization_id {
                None => Some("org_other"),
                Some(_) if rng.chance(50) => None,
                Some(o) => Some(if o == "org_other" {
                    "org_x"
                } else {
                    "org_other"
                }),
            },
            ..ctx
        };
        check(&mut node, &ring, &env, &token, &other_org, auth, "auth");
        // a keyring without the secret that wrote it
        let mut gone: Vec<&str> = pool.iter().map(|(s, _)| s.as_str()).collect();
        gone.retain(|s| !secrets_of(&pool, &ring_ix).contains(s));
        let gone = gone[..3].join(",");
        let gone_ring = Keyring::parse(&gone).unwrap();
        if version == "v2" {
            let kid = llmgw::KeyId::parse(parts[2]).unwrap();
            let want = LlmgwError::UnknownKeyId(kid);
            check(
                &mut node,
                &gone_ring,
                &gone,
                &token,
                &ctx,
                want,
                "unknown_kid",
            );
            // another key id
            let mut k: Vec<char> = parts[2].chars().collect();
            k[0] = if k[0] == '0' { '1' } else { '0' };
            let other: String = k.into_iter().collect();
            let want = LlmgwError::UnknownKeyId(llmgw::KeyId::parse(&other).unwrap());
            check(
                &mut node,
                &ring,
                &env,
                &with(2, &other),
                &ctx,
                want,
                "unknown_kid",
            );
        } else {
            check(&mut node, &gone_ring, &gone, &token, &ctx, auth, "auth");
        }
        // shape: parts, version, iv and tag lengths
        let m = LlmgwError::Malformed;
        let dropped = parts[..parts.len() - 1].join(":");
        check(
            &mut node,
            &ring,
            &env,
            &dropped,
            &ctx,
            m(Malformed::PartCount),
            "part_count",
        );
        let extra = format!("{token}:AAAA");
        check(
            &mut node,
            &ring,
            &env,
            &extra,
            &ctx,
            m(Malformed::PartCount),
            "part_count",
        );
        let v3 = token.replacen(&format!("llmgw:{version}:"), "llmgw:v3:", 1);
        check(
            &mut node,
            &ring,
            &env,
            &v3,
            &ctx,
            LlmgwError::UnknownVersion,
            "unknown_version",
        );
        let iv11 = with(first, &b64url(&rng.bytes::<11>()));
        check(
            &mut node,
            &ring,
            &env,
            &iv11,
            &ctx,
            m(Malformed::IvLength),
            "iv_length",
        );
        let tag12 = with(first + 2, &b64url(&rng.bytes::<12>()));
        check(
            &mut node,
            &ring,
            &env,
            &tag12,
            &ctx,
            m(Malformed::TagLength),
            "tag_length",
        );
        // junk inside a part: Node's decoder skips it and opens the token; Rust refuses it
        let junk = *rng.pick(&["!", " ", ".", "*", "~", "\n"]);
        let iv = parts[first];
        let at = 1 + rng.below(iv.len() - 1);
        let t = with(first, &format!("{}{junk}{}", &iv[..at], &iv[at..]));
        assert_eq!(node.decrypt(&env, &t, &ctx).as_deref(), Ok(pt.as_str()));
        assert_eq!(must_fail(&ring, &t, &ctx), m(Malformed::Base64));
        junk_node_accepts += 1;
    }
    println!(
        "negative: {checks} refusals agree with Node's; {trailing_bit_only} character changes \
         that only touched unused bits opened on both sides; {junk_node_accepts} tokens with a \
         junk character opened by Node are refused by Rust (documented strictness)"
    );
    assert!(checks >= 3000);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
