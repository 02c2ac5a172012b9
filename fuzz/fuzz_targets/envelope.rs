//! Fuzz target `envelope`: the queue's envelope file reader.
//!
//! The format is canonical: whatever `Envelope::parse` accepts must be
//! exactly what `to_bytes` writes for it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use postling::store::envelope::Envelope;

fuzz_target!(|bytes: &[u8]| {
    match Envelope::parse(bytes) {
        Ok(e) => assert_eq!(
            e.to_bytes(),
            bytes,
            "accepted a non-canonical envelope: {:?}",
            String::from_utf8_lossy(bytes)
        ),
        // Every error renders (it goes to the log and to `postling queue`).
        Err(err) => assert!(err.to_string().starts_with("envelope line ")),
    }
});
