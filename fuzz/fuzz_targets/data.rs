//! Fuzz target `data`: the DATA decoder on its own.
//!
//! The first input byte picks a size limit and a chunk size; the rest is fed
//! in chunks, as the connection driver does. Checks the contract `conn.rs`
//! relies on: output never runs ahead of input (it decodes in place),
//! `produced <= consumed <= len`, bytes after the end marker are left
//! untouched for the next command, and the verdict does not depend on how
//! the input was split.

#![no_main]

use libfuzzer_sys::fuzz_target;
use postling::smtp::data::{DataDecoder, DataError, Stats};

/// What one run saw: the output, where the end marker left off, the verdict.
type Outcome = (Vec<u8>, Option<usize>, Result<Stats, DataError>);

fn run(input: &[u8], chunk: usize, max: u64) -> Outcome {
    let mut d = DataDecoder::new(max);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < input.len() {
        let end = (pos + chunk).min(input.len());
        let mut buf = input[pos..end].to_vec();
        let r = d.decode(&mut buf);
        assert!(r.produced <= r.consumed, "{r:?}");
        assert!(r.consumed <= buf.len(), "{r:?} len {}", buf.len());
        assert!(r.consumed > 0 || buf.is_empty(), "no progress: {r:?}");
        assert_eq!(
            &buf[r.consumed..],
            &input[pos + r.consumed..end],
            "bytes after consumed were modified"
        );
        if !r.done {
            assert_eq!(r.consumed, buf.len(), "stopped early without the end");
        }
        out.extend_from_slice(&buf[..r.produced]);
        pos += r.consumed;
        if r.done {
            return (out, Some(pos), d.finish());
        }
    }
    (out, None, d.finish())
}

fuzz_target!(|input: &[u8]| {
    let Some((&knob, data)) = input.split_first() else {
        return;
    };
    let max = [64, 1000, 1 << 20, u64::MAX][usize::from(knob & 3)];
    let chunk = 1 + usize::from(knob >> 2);
    let whole = run(data, data.len().max(1), max);
    let split = run(data, chunk, max);
    assert_eq!((&whole.1, &whole.2), (&split.1, &split.2), "chunk size {chunk}");
    if let Ok(stats) = whole.2 {
        assert_eq!(whole.0, split.0, "chunk size {chunk}: output differs");
        assert_eq!(stats.size, whole.0.len() as u64);
        assert!(stats.size <= max);
    }
    if let (Ok(_), Some(_)) = (&whole.2, whole.1) {
        // A good, finished message is CRLF-clean (an unfinished one may end
        // in the CR of a CRLF still to come).
        for (i, &b) in whole.0.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && whole.0[i - 1] == b'\r', "bare LF in output");
            }
            if b == b'\r' {
                assert_eq!(whole.0.get(i + 1), Some(&b'\n'), "bare CR in output");
            }
        }
    }
});
