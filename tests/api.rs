//! The control API on a running VMM (real KVM): every endpoint, every bad
//! request, concurrent clients, socket permissions, `vmm ctl`, and the
//! server checked against docs/openapi.json.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::{guest, spawn_lines, vmm};
use serde_json::{json, Value};

/// A `vmm run` with the API on a fresh socket; killed on drop.
struct Live {
    child: Child,
    socket: PathBuf,
}

impl Live {
    fn start(name: &str, extra: &[&str]) -> Live {
        let socket =
            std::env::temp_dir().join(format!("vmm-api-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let mut c = vmm();
        c.args(["run", "--vcpus", "1", "--mem", "128M", "--api-socket"])
            .arg(&socket)
            .args(extra)
            .arg("--kernel")
            .arg(guest("memstress"))
            .args(["--cmdline", "mode=0 rounds=1 bytes=4M hold=1"]);
        let (child, _out, _err) = spawn_lines(c);
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "API socket never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Live { child, socket }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// One raw HTTP/1.1 request; (status, body).
fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    common::unix_http(
        socket,
        method,
        path,
        body.unwrap_or(""),
        Duration::from_secs(10),
    )
}

fn get_json(socket: &Path, path: &str) -> Value {
    let (status, body) = http(socket, "GET", path, None);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn assert_error(r: (u16, String), status: u16, needle: &str) {
    assert_eq!(r.0, status, "{}", r.1);
    let v: Value = serde_json::from_str(&r.1).unwrap_or_else(|_| panic!("not JSON: {}", r.1));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {}", r.1));
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
}

#[test]
fn every_endpoint_and_every_bad_request() {
    let mut live = Live::start("all", &["--balloon", "0", "--balloon-stats-interval", "2"]);
    let s = &live.socket.clone();
    let mode = std::fs::metadata(s).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "API socket mode {mode:o}");

    let vm = get_json(s, "/vm");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["vcpus"], 1);
    assert_eq!(vm["memory"]["boot_mib"], 128);
    assert_eq!(vm["balloon"]["target_mib"], 0);
    // A booted VM has a first entry and one blocktime per vCPU; nothing
    // was restored.
    // The first entry is recorded when a vCPU first enters the guest,
    // which may come after the API answers: wait for it.
    let mut vm = vm;
    common::wait_for("the first guest entry", Duration::from_secs(60), || {
        vm = get_json(s, "/vm");
        vm["restore"]["first_entry_seconds"].as_f64().unwrap() > 0.0
    });
    let r = &vm["restore"];
    assert_eq!(r["vcpu_blocktime_seconds"].as_array().unwrap().len(), 1);
    assert_eq!(r["restore_pages"]["prefetch"], 0);

    assert_eq!(
        http(s, "PUT", "/balloon", Some(r#"{"target_mib": 16}"#)).0,
        204
    );
    let b = get_json(s, "/balloon");
    assert_eq!(b["target_mib"], 16);
    assert_eq!(b["target_pages"], 4096);
    assert_eq!(b["stats_interval_s"], 2);
    assert_eq!(
        http(
            s,
            "PUT",
            "/balloon/statistics",
            Some(r#"{"interval_s": 0}"#)
        )
        .0,
        204
    );
    assert_eq!(get_json(s, "/balloon")["stats_interval_s"], 0);

    // Bad requests: each a 4xx with a JSON error saying what was wrong.
    assert_error(http(s, "GET", "/nope", None), 404, "no such path /nope");
    assert_error(
        http(s, "DELETE", "/vm", None),
        405,
        "DELETE is not allowed on /vm",
    );
    assert_error(http(s, "GET", "/vm/stop", None), 405, "use PUT");
    assert_error(
        http(s, "PUT", "/balloon", Some("{not json")),
        400,
        "bad JSON body",
    );
    assert_error(
        http(s, "PUT", "/balloon", Some(r#"{"target": 1}"#)),
        400,
        "unknown field",
    );
    assert_error(
        http(s, "PUT", "/balloon", Some(r#"{"target_mib": -1}"#)),
        400,
        "bad JSON",
    );
    assert_error(
        http(s, "PUT", "/balloon", Some(r#"{"target_mib": 129}"#)),
        400,
        "larger than guest RAM",
    );
    assert_error(
        http(
            s,
            "PUT",
            "/balloon",
            Some(r#"{"target_mib": 18446744073709551615}"#),
        ),
        400,
        "too large",
    );
    assert_error(
        http(
            s,
            "PUT",
            "/balloon/statistics",
            Some(r#"{"interval_s": 1000000}"#),
        ),
        400,
        "longer than",
    );
    let huge = format!(r#"{{"target_mib": 1, "pad": "{}"}}"#, "x".repeat(100_000));
    assert_error(
        http(s, "PUT", "/balloon", Some(&huge)),
        413,
        "over 65536 bytes",
    );
    // The target did not move on any of them.
    assert_eq!(get_json(s, "/balloon")["target_mib"], 16);

    // Concurrent clients.
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    assert_eq!(http(&s, "GET", "/vm", None).0, 200);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    // A second VMM on the same socket is refused, clearly.
    let mut c = vmm();
    c.args(["run", "--api-socket"]).arg(s);
    let r = common::run_with(c, Duration::from_secs(30));
    r.assert_error("in use by a running VMM");

    // Stop through the API: status 0.
    assert_eq!(http(s, "PUT", "/vm/stop", None).0, 204);
    let status = wait(&mut live.child);
    assert_eq!(status, Some(0));
    assert!(!s.exists(), "the socket file is removed at exit");
}

fn wait(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        assert!(Instant::now() < deadline, "vmm did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn balloon_endpoints_without_a_balloon_say_so() {
    let live = Live::start("noballoon", &[]);
    let s = &live.socket;
    assert_eq!(get_json(s, "/vm")["balloon"], Value::Null);
    assert_error(
        http(s, "GET", "/balloon", None),
        409,
        "no balloon is configured",
    );
    assert_error(
        http(s, "PUT", "/balloon", Some(r#"{"target_mib": 1}"#)),
        409,
        "--balloon",
    );
    assert_error(http(s, "GET", "/memory", None), 409, "--hotplug");
}

#[test]
fn memory_endpoints() {
    let live = Live::start("memory", &["--hotplug", "256M", "--hotplug-block", "4M"]);
    let s = &live.socket;
    let m = get_json(s, "/memory");
    assert_eq!(m["region_mib"], 256);
    assert_eq!(m["block_size_mib"], 4);
    assert_eq!(m["region_addr"], 128 << 20, "above 128 MiB of boot RAM");
    assert_eq!(
        http(s, "PUT", "/memory", Some(r#"{"requested_mib": 64}"#)).0,
        204
    );
    assert_eq!(get_json(s, "/memory")["requested_mib"], 64);
    assert_eq!(get_json(s, "/vm")["hotplug"]["requested_mib"], 64);
    assert_error(
        http(s, "PUT", "/memory", Some(r#"{"requested_mib": 512}"#)),
        400,
        "larger than the hotplug region",
    );
    assert_error(
        http(s, "PUT", "/memory", Some(r#"{"requested_mib": 6}"#)),
        400,
        "not a multiple of the block size",
    );
    assert_error(
        http(s, "PUT", "/memory", Some(r#"{"mib": 6}"#)),
        400,
        "unknown field",
    );
    assert_eq!(get_json(s, "/memory")["requested_mib"], 64);
}

#[test]
fn stale_socket_is_replaced_and_other_files_are_not() {
    // A socket file nobody listens on (a VMM that died): replaced.
    let stale = std::env::temp_dir().join(format!("vmm-api-stale-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&stale);
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut c = vmm();
    c.args(["run", "--api-socket"])
        .arg(&stale)
        .args(["--kernel"])
        .arg(guest("hello"));
    common::run_with(c, Duration::from_secs(60)).assert_ok();
    // A regular file: refused, left alone.
    let file = std::env::temp_dir().join(format!("vmm-api-file-{}", std::process::id()));
    std::fs::write(&file, "keep me").unwrap();
    let mut c = vmm();
    c.args(["run", "--api-socket"]).arg(&file);
    common::run_with(c, Duration::from_secs(30)).assert_error("is not a socket");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn vmm_ctl_drives_every_endpoint() {
    let mut live = Live::start("ctl", &["--balloon", "0"]);
    let ctl = |args: &[&str]| {
        let mut c = vmm();
        c.arg("ctl")
            .arg("--api-socket")
            .arg(&live.socket)
            .args(args);
        common::run_with(c, Duration::from_secs(30))
    };
    let r = ctl(&["--json", "vm", "show"]);
    r.assert_ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["state"], "running");
    // For a person: aligned lines, the same values.
    let r = ctl(&["vm", "show"]);
    r.assert_ok();
    let line = |key: &str| {
        r.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no {key} line:\n{}", r.stdout))
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(line("state"), "running");
    assert_eq!(line("vcpus"), v["vcpus"].to_string());
    assert_eq!(line("boot_mib"), v["memory"]["boot_mib"].to_string());
    assert_eq!(line("hotplug"), "-", "no virtio-mem");
    assert_eq!(line("restore_pages"), "demand 0, prefetch 0");
    ctl(&["balloon", "set", "32M"]).assert_ok();
    let r = ctl(&["--json", "balloon", "show"]);
    r.assert_ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["target_mib"], 32);
    ctl(&["balloon", "stats-interval", "3"]).assert_ok();
    ctl(&["balloon", "set", "1G"]).assert_error("larger than guest RAM");
    ctl(&["balloon", "set", "1500K"]).assert_error("whole MiB");
    ctl(&["mem", "show"]).assert_error("no hotplug memory is configured");
    // Piped into a reader that has gone (`vmm ctl vm show | head -0`):
    // ends quietly, as Unix tools do, without a panic.
    for args in [&["vm", "show"][..], &["--json", "balloon", "show"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = vmm()
            .arg("ctl")
            .arg("--api-socket")
            .arg(&live.socket)
            .args(args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.is_empty(),
            "{args:?} into a closed pipe: {:?}, stderr {err}",
            out.status
        );
    }
    ctl(&["vm", "stop"]).assert_ok();
    assert_eq!(wait(&mut live.child), Some(0));
    // Nobody on the socket now: a clear error.
    ctl(&["vm", "show"]).assert_error("cannot connect to the API socket");
}

// ---- the server against docs/openapi.json ----

fn openapi() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let path = r.trim_start_matches("#/");
            path.split('/').fold(doc, |d, k| &d[k])
        }
        None => v,
    }
}

/// The subset of JSON Schema the document uses: type, required, properties,
/// additionalProperties, enum, nullable, allOf, minimum, $ref.
fn validate(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if v.is_null() {
        return if schema["nullable"] == true {
            Ok(())
        } else {
            Err(format!("{at}: null where not nullable"))
        };
    }
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            validate(doc, s, v, at)?;
        }
    }
    if let Some(e) = schema["enum"].as_array() {
        if !e.contains(v) {
            return Err(format!("{at}: {v} not in {e:?}"));
        }
    }
    match schema["type"].as_str() {
        Some("object") => {
            let o = v.as_object().ok_or(format!("{at}: not an object"))?;
            for r in schema["required"].as_array().into_iter().flatten() {
                let k = r.as_str().unwrap();
                if !o.contains_key(k) {
                    return Err(format!("{at}: missing {k}"));
                }
            }
            let props = schema["properties"].as_object();
            for (k, val) in o {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => validate(doc, s, val, &format!("{at}.{k}"))?,
                    None => match &schema["additionalProperties"] {
                        Value::Bool(false) => return Err(format!("{at}: unexpected {k}")),
                        s @ Value::Object(_) => validate(doc, s, val, &format!("{at}.{k}"))?,
                        _ => return Err(format!("{at}: {k} is not in the document")),
                    },
                }
            }
        }
        Some("integer") if !(v.is_u64() || v.is_i64()) => {
            return Err(format!("{at}: {v} not an integer"))
        }
        Some("number") if !v.is_number() => return Err(format!("{at}: {v} not a number")),
        Some("string") if !v.is_string() => return Err(format!("{at}: {v} not a string")),
        Some("boolean") if !v.is_boolean() => return Err(format!("{at}: {v} not a boolean")),
        _ => {}
    }
    if let (Some(min), Some(x)) = (schema["minimum"].as_f64(), v.as_f64()) {
        if x < min {
            return Err(format!("{at}: {x} < {min}"));
        }
    }
    Ok(())
}

#[test]
fn the_server_matches_its_openapi_document() {
    let doc = openapi();
    let live = Live::start("openapi", &["--balloon", "8M", "--hotplug", "128M"]);
    let s = &live.socket;
    let mut checked = 0;
    let snap = std::env::temp_dir().join(format!("vmm-openapi-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&snap);
    let snap_body = json!({ "dir": snap }).to_string();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            if path == "/vm/stop" {
                continue; // checked last: it ends the VM
            }
            let m = method.to_uppercase();
            let body = match (path.as_str(), m.as_str()) {
                ("/balloon", "PUT") => Some(r#"{"target_mib": 4}"#),
                ("/balloon/statistics", "PUT") => Some(r#"{"interval_s": 1}"#),
                ("/memory", "PUT") => Some(r#"{"requested_mib": 4}"#),
                ("/vm/snapshot", "PUT") => Some(snap_body.as_str()),
                // No key there: refused (409) before any connection.
                ("/vm/migrate", "PUT") => {
                    Some(r#"{"to": "unix:/nonexistent/dst.sock", "key_file": "/nonexistent/key"}"#)
                }
                _ => None,
            };
            // Request bodies must satisfy their own schema.
            if let Some(b) = body {
                let schema = &op["requestBody"]["content"]["application/json"]["schema"];
                validate(&doc, schema, &serde_json::from_str(b).unwrap(), "request").unwrap();
            }
            let (status, text) = http(s, &m, path, body);
            let responses = &op["responses"];
            let declared = &responses[status.to_string()];
            assert!(
                !declared.is_null(),
                "{m} {path}: status {status} not in the document"
            );
            let declared = resolve(&doc, declared);
            if let Some(schema) = declared["content"]["application/json"]["schema"].as_object() {
                let v: Value = serde_json::from_str(&text).unwrap();
                validate(
                    &doc,
                    &Value::Object(schema.clone()),
                    &v,
                    &format!("{m} {path}"),
                )
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
            }
            checked += 1;
        }
        // Every documented error answer is the Error schema.
        let (status, text) = http(s, "DELETE", path, None);
        assert_eq!(status, 405);
        validate(
            &doc,
            &json!({"$ref": "#/components/schemas/Error"}),
            &serde_json::from_str(&text).unwrap(),
            "405",
        )
        .unwrap();
    }
    assert!(checked >= 8, "only {checked} operations checked");
    // Every route the server has is in the document, with its methods.
    for (route, methods) in vmm::api::server::ROUTES {
        for m in methods.iter() {
            let op = &doc["paths"][*route][m.as_str().to_lowercase()];
            assert!(!op.is_null(), "{m} {route} is not in docs/openapi.json");
        }
    }
    assert_eq!(http(s, "PUT", "/vm/stop", None).0, 204);
    assert!(
        snap.join("manifest.json").exists(),
        "PUT /vm/snapshot wrote no snapshot"
    );
    let _ = std::fs::remove_dir_all(&snap);
}
