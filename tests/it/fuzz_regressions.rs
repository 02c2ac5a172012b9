//! Regression tests for what the fuzz targets in `fuzz/` found, one test a
//! finding, each named after the bug. The inputs themselves are kept in
//! `fuzz/regressions/<target>/`, where `scripts/fuzz.sh` replays them on
//! every run; these tests pin the behaviour in the normal test command too.

use postling::smtp::data::{DataDecoder, DataError, Stats};

/// Feeds `input` to a fresh decoder `chunk` bytes at a time, as the
/// connection driver does with whatever each read returned.
fn decode_in_chunks(input: &[u8], chunk: usize, max: u64) -> (bool, Result<Stats, DataError>) {
    let mut d = DataDecoder::new(max);
    for piece in input.chunks(chunk) {
        let mut buf = piece.to_vec();
        if d.decode(&mut buf).done {
            return (true, d.finish());
        }
    }
    (false, d.finish())
}

/// Found by the `data` target (fuzz/regressions/data/verdict-depends-on-chunking-*):
/// a message over the size limit that also has a bare LF got 550 5.6.0
/// (BareLineEnding) when it arrived in one read but 552 5.3.4 (TooBig) when
/// it arrived a byte at a time, because the first error wins and the size is
/// only counted at the end of each `decode` call. The reply must not depend
/// on how TCP split the stream.
#[test]
fn data_verdict_does_not_depend_on_chunking_when_too_big_and_bare_lf() {
    let input = [&[b'x'; 65][..], b"\n", b"\r\n.\r\n"].concat();
    let whole = decode_in_chunks(&input, input.len(), 64);
    assert!(whole.0, "the end marker is found");
    for chunk in 1..input.len() {
        assert_eq!(
            decode_in_chunks(&input, chunk, 64),
            whole,
            "chunk size {chunk}"
        );
    }
}
