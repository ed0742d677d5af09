//! Differential test: `keys::parse_key` against the gateway's own rule, Node's
//! `Buffer.from(key, "base64")` with a 32-byte length check (tests/interop/key_parse_oracle.mjs).
//!
//! Generates well over 100 000 key strings from a fixed seed (canonical, unpadded, URL-safe,
//! mixed alphabets, whitespace and CRLF, line wrapping, 31/33-byte and other lengths, junk
//! characters, `=` in odd places, a lone extra character, trailing bits, Unicode, very long
//! strings) and requires, for every one: Node accepts it iff we do, with the same 32 bytes.
//! Every rejection's message must be the fixed text naming the source, never the input.
//! One category is bytes that are not UTF-8, as an environment variable can hold: Node
//! decodes them with U+FFFD replacements (the oracle's `toString("utf8")`, like
//! `process.env`), and we go through `keys::env_text`.
//!
//! Needs `node` (the gateway runs Node 20; set `NODE=/path/to/node` to choose another binary).
//! Run: `cargo test -p provider_keys_encrypt_core --test key_parsing_node_diff -- --nocapture`

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::process::{Command, Stdio};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use provider_keys_encrypt_core::keys::{env_text, parse_key, KeySource, KEY_LEN};

const SEED: u64 = 0x7e57_da7a_2025_0001;
/// Cases per category (the "long" category has fewer: its strings are thousands of
/// characters, to reach Node's other allocation path, Buffer.from on ≥ 4 KiB).
const PER_CATEGORY: usize = 8_000;
const LONG_CASES: usize = 1_500;

/// xorshift64 (Marsaglia; 13, 7, 17): deterministic test data, not for anything secret.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn range(&mut self, lo: usize, hi_inclusive: usize) -> usize {
        lo + self.below(hi_inclusive - lo + 1)
    }
    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const WHITESPACE: &[&str] = &[
    " ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\u{a0}", "\u{2028}", "\u{3000}",
    "\u{feff}", "\u{85}",
];
const JUNK: &[char] = &[
    '!', '"', '#', '$', '%', '&', '\'', '(', ')', '*', ',', '.', ':', ';', '<', '>', '?', '@', '[',
    '\\', ']', '^', '`', '{', '|', '}', '~', '\0', '\x01', '\x1b', '\x7f', '\u{80}', '\u{ad}', 'é',
    'ü', 'ÿ', '×',
];

/// The base64 of `n` random bytes, in a random one of the four common spellings.
fn encoded(rng: &mut Rng, n: usize) -> String {
    let raw = rng.bytes(n);
    match rng.below(4) {
        0 => STANDARD.encode(&raw),
        1 => STANDARD_NO_PAD.encode(&raw),
        2 => URL_SAFE.encode(&raw),
        _ => URL_SAFE_NO_PAD.encode(&raw),
    }
}

/// A 32-byte key in a random ordinary spelling (mostly canonical).
fn key(rng: &mut Rng) -> String {
    if rng.percent(50) {
        STANDARD.encode(rng.bytes(KEY_LEN))
    } else {
        encoded(rng, KEY_LEN)
    }
}

fn insert_at_random(rng: &mut Rng, s: &str, piece: &str) -> String {
    let bounds: Vec<usize> = s.char_indices().map(|(i, _)| i).chain([s.len()]).collect();
    let at = *rng.pick(&bounds);
    format!("{}{piece}{}", &s[..at], &s[at..])
}

/// Replace the char at a random position with `with`.
fn substitute_at_random(rng: &mut Rng, s: &str, with: char) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() {
        return with.to_string();
    }
    let at = rng.below(chars.len());
    chars
        .iter()
        .enumerate()
        .map(|(i, &c)| if i == at { with } else { c })
        .collect()
}

fn mix_alphabets(rng: &mut Rng, s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '+' | '-' => *rng.pick(&['+', '-']),
            '/' | '_' => *rng.pick(&['/', '_']),
            c => c,
        })
        .collect()
}

/// A non-ASCII char, chosen to hit Node's UTF-16 low-byte truncation: BMP characters whose
/// low byte is a base64 character, `=` or junk; characters outside the BMP (a surrogate pair,
/// two low bytes); and a few specials.
fn unicode_char(rng: &mut Rng) -> char {
    loop {
        let c = match rng.below(5) {
            0 | 1 => {
                let low = match rng.below(3) {
                    0 | 1 => u32::from(*rng.pick(ALPHABET)),
                    _ => *rng.pick(&[u32::from(b'='), 0x2d, 0x5f, 0x00, 0x20, 0x0a]),
                };
                let high = rng.range(0x01, 0xff) as u32;
                char::from_u32((high << 8) | low)
            }
            2 => char::from_u32(rng.range(0x1_0000, 0x10_ffff) as u32),
            3 => Some(*rng.pick(&[
                '😀', '🔑', 'Ł', 'Ľ', 'ő', '\u{fffd}', '\u{feff}', '\u{2028}', '€', '中',
            ])),
            _ => char::from_u32(rng.range(0x80, 0xffff) as u32),
        };
        if let Some(c) = c {
            return c;
        }
    }
}

fn wrap(s: &str, width: usize, eol: &str) -> String {
    s.as_bytes()
        .chunks(width)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(eol)
}

fn generate(category: &str, rng: &mut Rng) -> String {
    match category {
        "canonical" => STANDARD.encode(rng.bytes(KEY_LEN)),
        "unpadded" => STANDARD_NO_PAD.encode(rng.bytes(KEY_LEN)),
        "url_safe" => {
            if rng.percent(50) {
                URL_SAFE.encode(rng.bytes(KEY_LEN))
            } else {
                URL_SAFE_NO_PAD.encode(rng.bytes(KEY_LEN))
            }
        }
        "mixed_alphabets" => {
            let k = key(rng);
            mix_alphabets(rng, &k)
        }
        "whitespace" => {
            let mut s = key(rng);
            for _ in 0..rng.range(1, 5) {
                let w = *rng.pick(WHITESPACE);
                s = match rng.below(3) {
                    0 => format!("{w}{s}"),
                    1 => format!("{s}{w}"),
                    _ => insert_at_random(rng, &s, w),
                };
            }
            s
        }
        "newline_crlf" => {
            let eol = *rng.pick(&["\n", "\r\n", "\r\n\r\n", " \n", "\n\n", "\r", "\n\r\n"]);
            let k = key(rng);
            match rng.below(3) {
                0 => format!("{k}{eol}"),
                1 => format!("{eol}{k}{eol}"),
                _ => insert_at_random(rng, &k, eol),
            }
        }
        "line_wrapped" => {
            let k = key(rng);
            let width = *rng.pick(&[4, 8, 16, 20, 40, 42, 43, 44, 64, 76]);
            let eol = *rng.pick(&["\n", "\r\n"]);
            let mut s = wrap(&k, width, eol);
            if rng.percent(50) {
                s.push_str(eol);
            }
            s
        }
        "too_short" => {
            let n = if rng.percent(60) {
                *rng.pick(&[30, 31])
            } else {
                rng.range(0, 31)
            };
            let s = encoded(rng, n);
            if rng.percent(30) {
                format!("{s}\n")
            } else {
                s
            }
        }
        "too_long" => {
            let n = if rng.percent(60) {
                *rng.pick(&[33, 34])
            } else {
                rng.range(33, 96)
            };
            let s = encoded(rng, n);
            if rng.percent(30) {
                mix_alphabets(rng, &format!("{s}\r\n"))
            } else {
                s
            }
        }
        "junk" => {
            let mut s = key(rng);
            for _ in 0..rng.range(1, 8) {
                let j = rng.pick(JUNK).to_string();
                s = insert_at_random(rng, &s, &j);
            }
            s
        }
        "equals_sign" => {
            let k = key(rng);
            let bare = k.trim_end_matches('=').to_owned();
            match rng.below(6) {
                0 => insert_at_random(rng, &k, "="),
                1 => insert_at_random(rng, &bare, "=="),
                2 => format!("={k}"),
                3 => format!("{bare}{}", "=".repeat(rng.range(0, 6))),
                4 => {
                    let n = rng.range(0, 8);
                    format!("{bare}={}", encoded(rng, n))
                }
                _ => {
                    let mut s = k;
                    for _ in 0..rng.range(1, 3) {
                        s = insert_at_random(rng, &s, "=");
                    }
                    s
                }
            }
        }
        "lone_char" => {
            // 40..46 alphabet characters: the lengths around 43 (43 → 32 bytes, a lone
            // 45th is dropped, 44 → 33 bytes)
            let mut chars: Vec<u8> = STANDARD_NO_PAD.encode(rng.bytes(KEY_LEN)).into_bytes();
            let target = rng.range(40, 46);
            while chars.len() < target {
                let at = rng.below(chars.len() + 1);
                chars.insert(at, *rng.pick(ALPHABET));
            }
            chars.truncate(target);
            let s = String::from_utf8(chars).unwrap();
            if rng.percent(30) {
                format!("{s}{}", "=".repeat(rng.range(1, 2)))
            } else {
                s
            }
        }
        "trailing_bits" => {
            let k = STANDARD.encode(rng.bytes(KEY_LEN));
            let mut b = k.into_bytes();
            b[42] = *rng.pick(ALPHABET);
            if rng.percent(50) {
                b.pop();
            }
            let s = String::from_utf8(b).unwrap();
            mix_alphabets(rng, &s)
        }
        "unicode" => {
            let mut s = key(rng);
            for _ in 0..rng.range(1, 4) {
                let c = unicode_char(rng);
                s = if rng.percent(50) {
                    insert_at_random(rng, &s, &c.to_string())
                } else {
                    substitute_at_random(rng, &s, c)
                };
            }
            s
        }
        "random" => {
            let len = if rng.percent(70) {
                rng.range(38, 52)
            } else {
                rng.range(0, 120)
            };
            (0..len)
                .map(|_| match rng.below(20) {
                    0..=13 => char::from(*rng.pick(ALPHABET)),
                    14 => *rng.pick(&['-', '_']),
                    15 => '=',
                    16 => *rng.pick(JUNK),
                    17 => rng.pick(WHITESPACE).chars().next().unwrap(),
                    _ => unicode_char(rng),
                })
                .collect()
        }
        "long" => {
            // 42..44 alphabet characters scattered through 4 000..9 000 characters of junk
            let valid = STANDARD_NO_PAD.encode(rng.bytes(KEY_LEN + 1));
            let n_valid = rng.range(42, 44);
            let total = rng.range(4_000, 9_000);
            let mut positions: Vec<usize> = (0..n_valid).map(|_| rng.below(total)).collect();
            positions.sort_unstable();
            let mut s = String::new();
            let mut next = 0;
            for i in 0..total {
                while next < n_valid && positions[next] == i {
                    s.push(char::from(valid.as_bytes()[next]));
                    next += 1;
                }
                s.push(match rng.below(4) {
                    0 => ' ',
                    1 => '\n',
                    2 => *rng.pick(JUNK),
                    _ => *rng.pick(&['é', '€', '\u{fffd}', '.', '*']),
                });
            }
            while next < n_valid {
                s.push(char::from(valid.as_bytes()[next]));
                next += 1;
            }
            if rng.percent(20) {
                s.push('=');
            }
            s
        }
        other => unreachable!("{other}"),
    }
}

/// The bytes of one case: UTF-8 text, except for "invalid_utf8", a key with bytes inserted
/// that are not UTF-8 (stray continuation and lead bytes, overlong forms, encoded
/// surrogates, code points past U+10FFFF).
fn generate_bytes(category: &str, rng: &mut Rng) -> Vec<u8> {
    if category != "invalid_utf8" {
        return generate(category, rng).into_bytes();
    }
    const BAD: &[&[u8]] = &[
        b"\x80",
        b"\xbf",
        b"\xc3",
        b"\xe2\x82",
        b"\xf0\x9f\x98",
        b"\xff",
        b"\xfe",
        b"\xc0\xaf",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xc3\x28",
        b"\xe2\x3d",
    ];
    let mut bytes = key(rng).into_bytes();
    for _ in 0..rng.range(1, 4) {
        let at = rng.below(bytes.len() + 1);
        let bad = *rng.pick(BAD);
        bytes.splice(at..at, bad.iter().copied());
    }
    bytes
}

const CATEGORIES: &[&str] = &[
    "canonical",
    "unpadded",
    "url_safe",
    "mixed_alphabets",
    "whitespace",
    "newline_crlf",
    "line_wrapped",
    "too_short",
    "too_long",
    "junk",
    "equals_sign",
    "lone_char",
    "trailing_bits",
    "unicode",
    "random",
    "long",
    "invalid_utf8",
];

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn node_binary() -> String {
    std::env::var("NODE").unwrap_or_else(|_| "node".to_owned())
}

#[derive(Default)]
struct Counts {
    cases: usize,
    node_accepts: usize,
    mismatches: usize,
}

#[test]
fn parse_key_accepts_exactly_what_node_accepts() {
    let mut rng = Rng(SEED);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    for &category in CATEGORIES {
        let n = if category == "long" {
            LONG_CASES
        } else {
            PER_CATEGORY
        };
        for _ in 0..n {
            cases.push((category, generate_bytes(category, &mut rng)));
        }
    }
    assert!(cases.len() >= 100_000, "{} cases", cases.len());

    let node = node_binary();
    let version = Command::new(&node)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("this test needs Node.js ({node}): {e}; set NODE=…"));
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/interop/key_parse_oracle.mjs"
    );
    let mut child = Command::new(&node)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn node");

    // Write from another thread while this one reads, so neither pipe can fill up and stall.
    let lines: Vec<String> = cases.iter().map(|(_, b)| hex(b)).collect();
    let stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let mut w = BufWriter::new(stdin);
        for line in lines {
            writeln!(w, "{line}").unwrap();
        }
        w.flush().unwrap();
    });
    let answers: Vec<String> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .collect();
    writer.join().unwrap();
    assert!(child.wait().unwrap().success(), "node failed");
    assert_eq!(answers.len(), cases.len(), "one answer per case");

    let sources = [KeySource::Environment, KeySource::EnvironmentPrevious(3)];
    let mut counts: BTreeMap<&str, Counts> = BTreeMap::new();
    let mut shown = 0;
    for (i, ((category, input), answer)) in cases.iter().zip(&answers).enumerate() {
        let node_key = answer.strip_prefix("ok ").map(str::to_owned);
        assert!(node_key.is_some() || answer.starts_with("no "), "{answer}");
        let source = sources[i % sources.len()];
        let parsed = match std::str::from_utf8(input) {
            Ok(text) => parse_key(text, source),
            Err(_) => parse_key(&env_text(input.clone()), source),
        };
        let input = String::from_utf8_lossy(input);
        let ours = match parsed {
            Ok(k) => Some(hex(&k[..])),
            Err(e) => {
                // fixed text naming the source; nothing from the input
                let msg = e.to_string();
                assert_eq!(
                    msg,
                    format!("{source} must be a 32-byte key, base64-encoded")
                );
                assert_eq!(format!("{e:?}"), format!("Invalid({source:?})"));
                if input.len() >= 8 {
                    assert!(!msg.contains(&*input), "message contains the input");
                }
                None
            }
        };
        let c = counts.entry(category).or_default();
        c.cases += 1;
        c.node_accepts += usize::from(node_key.is_some());
        if ours != node_key {
            c.mismatches += 1;
            if shown < 20 {
                shown += 1;
                eprintln!("MISMATCH [{category}] {input:?}: node {answer}, ours {ours:?}");
            }
        }
    }

    println!("parse_key vs Node {version}: seed {SEED:#x}");
    println!(
        "{:<16} {:>7} {:>8} {:>8} {:>10}",
        "category", "cases", "accepted", "rejected", "mismatches"
    );
    let (mut total, mut accepted, mut mismatches) = (0, 0, 0);
    for (category, c) in &counts {
        println!(
            "{category:<16} {:>7} {:>8} {:>8} {:>10}",
            c.cases,
            c.node_accepts,
            c.cases - c.node_accepts,
            c.mismatches
        );
        total += c.cases;
        accepted += c.node_accepts;
        mismatches += c.mismatches;
    }
    println!(
        "{:<16} {total:>7} {accepted:>8} {:>8} {mismatches:>10}",
        "total",
        total - accepted
    );
    assert_eq!(mismatches, 0, "parse_key disagrees with Node (see above)");
    // the generator really exercises both sides of the rule
    assert!(accepted >= 20_000 && total - accepted >= 20_000);
    for category in [
        "unicode",
        "equals_sign",
        "lone_char",
        "random",
        "long",
        "invalid_utf8",
    ] {
        let c = &counts[category];
        assert!(
            c.node_accepts > 0 && c.node_accepts < c.cases,
            "{category}: both outcomes expected"
        );
    }
}
