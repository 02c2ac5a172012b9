//! Fuzz target `dns`: the stub resolver's reply decoder, through
//! `postling::relay::dns::fuzz_decode` (the decoder itself is private). The
//! query id is taken from the input's first two bytes so that the decoder
//! gets past the id check and parses the packet.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    postling::relay::dns::fuzz_decode(bytes);
});
