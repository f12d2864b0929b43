//! Every committed fuzz input — the seed corpus, and in
//! `comet-core/fuzz/regressions/<target>/` the inputs fuzzing found to add
//! coverage (`cov-*`) and each crash a fuzzer ever found (`crash-*`) —
//! runs through the same checks as the fuzz targets, in the normal test
//! suite.

#[path = "../comet-core/fuzz/checks.rs"]
mod checks;
#[path = "../comet-core/fuzz/session_check.rs"]
mod session_check;

use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("comet-core/fuzz");
    let mut all = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            all.push((
                format!("{dir}/{target}/{name}"),
                std::fs::read(&path).unwrap(),
            ));
        }
    }
    all
}

fn run(target: &str, check: fn(&[u8])) {
    let inputs = inputs(target);
    for (name, data) in &inputs {
        let outcome = std::panic::catch_unwind(|| check(data));
        assert!(outcome.is_ok(), "fuzz input {name} fails its check");
    }
    assert!(inputs.len() >= 10, "{target}: inputs missing");
}

#[test]
fn tcp_decoder_inputs() {
    run("tcp_decoder", checks::tcp_decoder);
}

#[test]
fn json_frame_inputs() {
    run("json_frame", checks::json_frame);
}

#[test]
fn payload_inputs() {
    run("payloads", checks::payloads);
}

#[test]
fn batch_reader_inputs() {
    run("batch_reader", checks::batch_reader);
}

#[test]
fn session_inputs() {
    run("session", session_check::session);
}

/// The checks can fail: each catches the fault it is there for.
mod the_checks_fail {
    use super::*;
    use comet::core::{BoxError, FrameRequest, FrameResponse};

    /// A login and then one frame of op 1000, in binary mode.
    fn login_then_op_1000() -> Vec<u8> {
        let mut data = vec![2u8]; // binary, valid op 7 first
        data.extend_from_slice(&16u32.to_be_bytes());
        data.extend_from_slice(&16u16.to_be_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&1000u32.to_be_bytes());
        data.extend_from_slice(&2u32.to_be_bytes());
        data
    }

    #[test]
    fn the_session_check_passes_a_handler_that_behaves() {
        session_check::session_with(&login_then_op_1000(), |b| {
            b.handler(
                1000,
                tower::service_fn(|_req: FrameRequest| async {
                    Ok::<FrameResponse, BoxError>(None)
                }),
            )
        });
    }

    #[test]
    #[should_panic(expected = "ended with Panic")]
    fn the_session_check_fails_on_a_panic_the_engine_caught() {
        session_check::session_with(&login_then_op_1000(), |b| {
            b.handler(
                1000,
                tower::service_fn(|_req: FrameRequest| async {
                    panic!("handler bug");
                    #[allow(unreachable_code)]
                    Ok::<FrameResponse, BoxError>(None)
                }),
            )
        });
    }
}
