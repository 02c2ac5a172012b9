//! SHA-512-crypt (`$6$`), the scheme of glibc's crypt(3) and `openssl
//! passwd -6`, as specified in Ulrich Drepper's "Unix crypt using SHA-256
//! and SHA-512" (<https://www.akkadia.org/drepper/SHA-crypt.txt>).
//!
//! Verify only, on ring's SHA-512 (already in the binary for TLS), so no
//! second SHA-2 implementation is linked in. `parse` checks a hash's shape
//! once, when the users file is loaded; `digest` recomputes the digest
//! field for a password, and `matches` compares it in constant time.

use ring::digest::{Context, SHA512};

/// Rounds when the hash names none.
const DEFAULT_ROUNDS: u32 = 5000;
/// The spec's bounds; glibc clamps a count outside them, which would verify
/// something else than the file says, so [`parse`] refuses it instead.
const ROUNDS: std::ops::RangeInclusive<u32> = 1000..=999_999_999;
/// Salt characters used; glibc ignores the rest.
const MAX_SALT: usize = 16;
/// The crypt base64 alphabet ('.' is 0).
const ALPHABET: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// 64 bytes in crypt base64.
const DIGEST_LEN: usize = 86;

/// The parts of `$6$[rounds=N$]salt$digest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed<'a> {
    rounds: u32,
    salt: &'a str,
    digest: &'a str,
}

/// Splits and checks a whole `$6$...` hash.
pub fn parse(hash: &str) -> Result<Parsed<'_>, String> {
    let rest = hash
        .strip_prefix("$6$")
        .ok_or_else(|| "does not start with $6$".to_string())?;
    let mut fields: Vec<&str> = rest.split('$').collect();
    let mut rounds = DEFAULT_ROUNDS;
    if let Some(n) = fields.first().and_then(|f| f.strip_prefix("rounds=")) {
        // Digits only, no leading zero: what glibc and libxcrypt accept.
        let digits = !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && !n.starts_with('0');
        rounds = n
            .parse()
            .ok()
            .filter(|n| digits && ROUNDS.contains(n))
            .ok_or_else(|| "rounds must be a number from 1000 to 999999999".to_string())?;
        fields.remove(0);
    }
    let [salt, digest] = fields[..] else {
        return Err("expected $6$[rounds=N$]salt$digest".into());
    };
    if salt.is_empty() {
        return Err("empty salt".into());
    }
    if salt.len() > MAX_SALT || !salt.bytes().all(|b| ALPHABET.contains(&b)) {
        return Err("the salt must be at most 16 characters of [./0-9A-Za-z]".into());
    }
    if digest.len() != DIGEST_LEN {
        return Err(format!("digest is {} characters, not 86", digest.len()));
    }
    // The last character holds the last byte's two top bits: 0 to 3.
    if !digest.bytes().all(|b| ALPHABET.contains(&b))
        || !ALPHABET[..4].contains(&digest.as_bytes()[85])
    {
        return Err("invalid characters in the digest".into());
    }
    Ok(Parsed {
        rounds,
        salt,
        digest,
    })
}

/// Whether `password` has the digest of `hash` (a [`parse`]d one): the
/// comparison takes the same time wherever the digests differ.
pub fn matches(hash: &Parsed<'_>, password: &[u8]) -> bool {
    if hash.digest.len() != DIGEST_LEN {
        return false;
    }
    let computed = digest(password, hash.salt.as_bytes(), hash.rounds);
    let differ = computed
        .iter()
        .zip(hash.digest.as_bytes())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(differ) == 0
}

fn sha512(parts: &[&[u8]]) -> [u8; 64] {
    let mut ctx = Context::new(&SHA512);
    for p in parts {
        ctx.update(p);
    }
    finish(ctx)
}

fn finish(ctx: Context) -> [u8; 64] {
    let mut out = [0u8; 64];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Adds `len` bytes of `block` repeated (whole copies, then a prefix).
fn update_repeated(ctx: &mut Context, block: &[u8; 64], len: usize) {
    for _ in 0..len / 64 {
        ctx.update(block);
    }
    ctx.update(&block[..len % 64]);
}

/// The digest field (steps 1-22 of the spec) for `password`, `salt` (at
/// most its first 16 bytes count) and `rounds`.
fn digest(password: &[u8], salt: &[u8], rounds: u32) -> [u8; DIGEST_LEN] {
    let p = password;
    let s = &salt[..salt.len().min(MAX_SALT)];
    // B = SHA512(P S P).
    let b = sha512(&[p, s, p]);
    // A = SHA512(P S, B for each byte of P, then B or P per bit of len(P)).
    let mut ctx = Context::new(&SHA512);
    ctx.update(p);
    ctx.update(s);
    update_repeated(&mut ctx, &b, p.len());
    let mut n = p.len();
    while n > 0 {
        ctx.update(if n & 1 == 1 { &b[..] } else { p });
        n >>= 1;
    }
    let a = finish(ctx);
    // The P and S sequences: DP = SHA512(P, len(P) times), DS =
    // SHA512(S, 16 + A[0] times), each cut to the length of P or S.
    let mut ctx = Context::new(&SHA512);
    for _ in 0..p.len() {
        ctx.update(p);
    }
    let dp = finish(ctx);
    let p_seq: Vec<u8> = dp.iter().cycle().take(p.len()).copied().collect();
    let mut ctx = Context::new(&SHA512);
    for _ in 0..16 + usize::from(a[0]) {
        ctx.update(s);
    }
    let ds = finish(ctx);
    let s_seq = &ds[..s.len()];
    // The rounds.
    let mut c = a;
    for i in 0..rounds {
        let mut ctx = Context::new(&SHA512);
        if i & 1 == 1 {
            ctx.update(&p_seq);
        } else {
            ctx.update(&c);
        }
        if i % 3 != 0 {
            ctx.update(s_seq);
        }
        if i % 7 != 0 {
            ctx.update(&p_seq);
        }
        if i & 1 == 1 {
            ctx.update(&c);
        } else {
            ctx.update(&p_seq);
        }
        c = finish(ctx);
    }
    encode(&c)
}

/// The spec's crypt base64 of the final digest: 21 groups of three bytes,
/// (k, k+21, k+42) rotated by k, most significant first, each written as
/// four characters from its low six bits up; then byte 63 alone.
fn encode(c: &[u8; 64]) -> [u8; DIGEST_LEN] {
    let mut out = [0u8; DIGEST_LEN];
    let mut put = |at: usize, w: u32, chars: usize| {
        for j in 0..chars {
            out[at + j] = ALPHABET[((w >> (6 * j)) & 0x3f) as usize];
        }
    };
    for k in 0..21 {
        let (x, y, z) = (c[k], c[k + 21], c[k + 42]);
        let (b2, b1, b0) = match k % 3 {
            0 => (x, y, z),
            1 => (y, z, x),
            _ => (z, x, y),
        };
        let w = u32::from(b2) << 16 | u32::from(b1) << 8 | u32::from(b0);
        put(4 * k, w, 4);
    }
    put(84, u32::from(c[63]), 2);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crypt(password: &str, hash: &str) -> bool {
        matches(&parse(hash).expect("valid hash"), password.as_bytes())
    }

    #[test]
    fn the_specs_vectors() {
        // From the spec's test suite.
        assert!(crypt(
            "Hello world!",
            "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"
        ));
        assert!(crypt(
            "Hello world!",
            "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v."
        ));
        assert!(crypt(
            "This is just a test",
            "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUhx1yxdYcz/e1JSbq3y6JMxxl8audkUEm0"
        ));
    }

    #[test]
    fn the_salt_counts_up_to_16_characters() {
        // The spec's vector with "saltstringsaltstring": only 16 count.
        let full = digest(b"Hello world!", b"saltstringsaltstring", 10000);
        assert_eq!(full, digest(b"Hello world!", b"saltstringsaltst", 10000));
    }

    #[test]
    fn agrees_with_the_sha_crypt_crate() {
        use argon2::PasswordVerifier;
        use sha_crypt::ShaCrypt;
        let lengths: Vec<String> = [63, 64, 65, 200].iter().map(|&n| "x".repeat(n)).collect();
        let mut cases = vec![
            ("", "a", 1000),
            ("secret", "saltsalt", 5000),
            ("pässwörd ☃", "pepper", 1000),
        ];
        for (n, password) in lengths.iter().enumerate() {
            cases.push((password, ["./", "0123456789abcdef", "Z", "s"][n], 1234));
        }
        for (password, salt, rounds) in cases {
            let hash = parse_and_check(password, salt, rounds);
            assert!(
                ShaCrypt::SHA512
                    .verify_password(password.as_bytes(), hash.as_str())
                    .is_ok(),
                "{hash}"
            );
        }
    }

    fn parse_and_check(password: &str, salt: &str, rounds: u32) -> String {
        let d = digest(password.as_bytes(), salt.as_bytes(), rounds);
        let text = std::str::from_utf8(&d).expect("ascii").to_string();
        let hash = if rounds == DEFAULT_ROUNDS {
            format!("$6${salt}${text}")
        } else {
            format!("$6$rounds={rounds}${salt}${text}")
        };
        assert!(crypt(password, &hash));
        assert!(!crypt(&format!("{password}x"), &hash));
        hash
    }

    #[test]
    fn bad_hashes_are_refused() {
        let d = ".".repeat(DIGEST_LEN);
        for (hash, why) in [
            (format!("$6$rounds=999$salt${d}"), "rounds must be"),
            (format!("$6$rounds=1000000000$salt${d}"), "rounds must be"),
            (format!("$6$rounds=x$salt${d}"), "rounds must be"),
            (format!("$6$rounds=05000$salt${d}"), "rounds must be"),
            (format!("$6$rounds=+5000$salt${d}"), "rounds must be"),
            (format!("$6$rounds=$salt${d}"), "rounds must be"),
            (format!("$6$salt${}2", &d[..85]), "invalid characters"),
            (format!("$6$${d}"), "empty salt"),
            (format!("$6$sa:lt${d}"), "the salt must be"),
            (format!("$6$saltsaltsaltsaltX${d}"), "the salt must be"),
            ("$6$salt$short".to_string(), "digest is 5 characters"),
            (
                format!("$6$salt${}", "!".repeat(DIGEST_LEN)),
                "invalid characters",
            ),
            (format!("$6$a$b${d}"), "expected $6$"),
            ("$5$salt$x".to_string(), "does not start"),
        ] {
            let e = parse(&hash).expect_err(&hash);
            assert!(e.contains(why), "{hash}: {e}");
        }
    }
}
