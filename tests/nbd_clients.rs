//! `twinvol export` against real NBD clients: nbdinfo, qemu-io, qemu-img, nbdcopy, fio's nbd
//! engine, the crates.io `nbd` client (EXPORT_NAME path), and a real ext4 filesystem through
//! nbdfuse + a loop device. These need the tools from scripts/test-deps.sh and fail loudly
//! without them.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};

use common::{require, scratch, sh, sh_out, sparse_file, Export};

const MIB: u64 = 1024 * 1024;

#[test]
fn nbdinfo_shows_every_capability_and_base_allocation_for_both_engines() {
    require(&["nbdinfo"]);
    let dir = scratch();
    let img = sparse_file(dir.path(), "disk.img", 64 * MIB);
    for engine in ["uring", "sync"] {
        let e = Export::start(&img, dir.path(), &["--engine", engine]);
        let info = sh_out(&format!("nbdinfo '{}'", e.uri()));
        for cap in [
            "can_flush: true",
            "can_fua: true",
            "can_trim: true",
            "can_zero: true",
            "can_fast_zero: true",
            "can_multi_conn: true",
            "can_cache: true",
            "base:allocation",
            "export-size: 67108864",
            "block_size_maximum: 33554432",
        ] {
            assert!(
                info.contains(cap),
                "{engine}: `{cap}` missing from nbdinfo:\n{info}"
            );
        }
        assert!(
            info.contains(&format!("{engine} engine")),
            "description names the engine:\n{info}"
        );
        assert!(e.stop().success());
    }
}

#[test]
fn read_only_export_refuses_writes() {
    require(&["nbdinfo", "qemu-io"]);
    let dir = scratch();
    let img = sparse_file(dir.path(), "disk.img", 16 * MIB);
    let e = Export::start(&img, dir.path(), &["--read-only"]);
    assert!(sh_out(&format!("nbdinfo '{}'", e.uri())).contains("is_read_only: true"));
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &e.uri(), "-c", "write 0 4k"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Operation not permitted")
            || text.contains("read-only")
            || text.contains("Permission denied"),
        "{text}"
    );
}

#[test]
fn qemu_io_pattern_zero_discard_flush_and_map_round_trip() {
    require(&["qemu-io"]);
    let dir = scratch();
    let img = sparse_file(dir.path(), "disk.img", 64 * MIB);
    for engine in ["uring", "sync"] {
        let e = Export::start(&img, dir.path(), &["--engine", engine]);
        let u = e.uri();
        let out = sh_out(&format!(
            "qemu-io -f raw '{u}' -c 'write -P 0xab 0 4M' -c 'read -P 0xab 0 4M' -c 'write -z 1M 1M' -c 'read -P 0 1M 1M' \
             -c 'discard 2M 1M' -c 'write -P 0xcd 8M 64k' -c 'flush' -c 'read -P 0xcd 8M 64k' -c 'write -P 0x3 7 1000' \
             -c 'read -P 0x3 7 1000' -c 'read -P 0xab 1007 3089' -c 'map'"
        ));
        assert!(
            !out.contains("Pattern verification failed") && !out.contains("error"),
            "{engine}:\n{out}"
        );
        assert!(
            out.contains("allocated") || out.contains("not allocated"),
            "map output:\n{out}"
        );
        assert!(e.stop().success());
    }
    // The data is in the file itself.
    let mut f = std::fs::File::open(&img).unwrap();
    let mut b = [0u8; 4];
    f.seek(SeekFrom::Start(8 * MIB)).unwrap();
    f.read_exact(&mut b).unwrap();
    assert_eq!(b, [0xcd; 4]);
}

#[test]
fn qemu_img_convert_into_and_out_of_the_export_compares_identical() {
    require(&["qemu-img"]);
    let dir = scratch();
    let d = dir.path().display();
    sh(&format!("head -c 48M /dev/urandom > {d}/src.raw && truncate -s 64M {d}/src.raw && qemu-img convert -f raw -O qcow2 {d}/src.raw {d}/src.qcow2"));
    let img = sparse_file(dir.path(), "disk.img", 64 * MIB);
    let e = Export::start(&img, dir.path(), &[]);
    let u = e.uri();
    sh(&format!(
        "qemu-img convert -n -f qcow2 -O raw {d}/src.qcow2 '{u}'"
    ));
    sh(&format!(
        "qemu-img convert -f raw -O qcow2 '{u}' {d}/out.qcow2"
    ));
    let cmp = sh_out(&format!(
        "qemu-img compare -f qcow2 -F qcow2 {d}/src.qcow2 {d}/out.qcow2"
    ));
    assert!(cmp.contains("Images are identical"), "{cmp}");
    sh(&format!("qemu-img compare -f raw -F raw {d}/src.raw '{u}'"));
}

#[test]
fn nbdcopy_multi_conn_copies_256_mib_in_and_out_byte_identical() {
    require(&["nbdcopy"]);
    let dir = scratch();
    let d = dir.path().display();
    sh(&format!("head -c 256M /dev/urandom > {d}/rand.bin"));
    let img = sparse_file(dir.path(), "disk.img", 256 * MIB);
    let e = Export::start(&img, dir.path(), &[]);
    let u = e.uri();
    sh(&format!(
        "nbdcopy --connections=4 --requests=16 {d}/rand.bin '{u}'"
    ));
    sh(&format!(
        "nbdcopy --connections=4 --requests=16 '{u}' {d}/back.bin"
    ));
    sh(&format!("cmp {d}/rand.bin {d}/back.bin"));
    assert!(e.stop().success());
    sh(&format!("cmp {d}/rand.bin {d}/disk.img"));
}

#[test]
fn fio_nbd_engine_random_writes_verify_crc32c() {
    require(&["fio"]);
    let dir = scratch();
    let img = sparse_file(dir.path(), "disk.img", 64 * MIB);
    for engine in ["uring", "sync"] {
        let e = Export::start(&img, dir.path(), &["--engine", engine]);
        let out = sh_out(&format!(
            "fio --name=verify --ioengine=nbd --uri='{}' --rw=randwrite --bs=4k --iodepth=32 --size=32M \
             --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --output-format=terse --terse-version=3",
            e.uri()
        ));
        // terse v3: field 5 is the error code of the job.
        let fields: Vec<&str> = out.trim().split(';').collect();
        assert_eq!(
            fields.get(4),
            Some(&"0"),
            "{engine}: fio reported an error:\n{out}"
        );
        assert!(e.stop().success());
    }
}

#[test]
fn nbd_crate_client_uses_the_export_name_path() {
    let dir = scratch();
    let img = sparse_file(dir.path(), "disk.img", 4 * MIB);
    let e = Export::start(&img, dir.path(), &["--name", "vol1"]);
    let mut s = std::os::unix::net::UnixStream::connect(&e.socket).unwrap();
    let export = nbd::client::handshake(&mut s, b"vol1").unwrap();
    assert_eq!(export.size, 4 * MIB);
    let mut c = nbd::client::NbdClient::new(&mut s, &export);
    c.seek(SeekFrom::Start(4096)).unwrap();
    c.write_all(&[0x42; 4096]).unwrap();
    c.flush().unwrap();
    c.seek(SeekFrom::Start(4096)).unwrap();
    let mut back = [0u8; 4096];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, [0x42; 4096]);
    // A wrong name is refused by closing the connection (EXPORT_NAME has no error reply).
    let mut s2 = std::os::unix::net::UnixStream::connect(&e.socket).unwrap();
    assert!(nbd::client::handshake(&mut s2, b"nope").is_err());
}

#[test]
fn ext4_on_the_export_survives_a_server_restart() {
    require(&[
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "mount",
        "umount",
        "fusermount3",
    ]);
    assert!(
        std::path::Path::new("/dev/fuse").exists(),
        "/dev/fuse missing: FUSE is required for this test"
    );
    let dir = scratch();
    let d = dir.path().display();
    let img = sparse_file(dir.path(), "disk.img", 128 * MIB);
    sh(&format!("mkdir -p {d}/fuse {d}/mnt"));
    let with_fs = |body: &str| {
        let e = Export::start(&img, dir.path(), &[]);
        let u = e.uri();
        let script = format!(
            "set -e; nbdfuse {d}/fuse/nbd '{u}' >/dev/null 2>&1 & fpid=$!; \
             for i in $(seq 100); do [ -e {d}/fuse/nbd ] && break; sleep 0.05; done; \
             loop=$(losetup -f --show {d}/fuse/nbd); \
             trap 'set +e; umount {d}/mnt 2>/dev/null; losetup -d $loop; \
                   for i in $(seq 100); do fusermount3 -u {d}/fuse 2>/dev/null && break; sleep 0.1; done; \
                   kill $fpid 2>/dev/null; wait $fpid' EXIT; \
             {body}"
        );
        let out = sh_out(&script);
        assert!(e.stop().success(), "server exit");
        out
    };
    with_fs(&format!(
        "mkfs.ext4 -q -F $loop; mount $loop {d}/mnt; for i in $(seq 20); do head -c 1M /dev/urandom > {d}/mnt/f$i; done; \
         sha256sum {d}/mnt/f* | sed 's#{d}/mnt/##' > {d}/sums; umount {d}/mnt; fsck.ext4 -fn $loop"
    ));
    let out = with_fs(&format!(
        "fsck.ext4 -fn $loop; mount $loop {d}/mnt; (cd {d}/mnt && sha256sum -c {d}/sums); umount {d}/mnt"
    ));
    assert_eq!(
        out.matches(": OK").count(),
        20,
        "all files intact after restart:\n{out}"
    );
}

#[test]
fn stdio_mode_survives_the_nbdkit_seed_streams_and_garbage() {
    let dir = scratch();
    let img = sparse_file(dir.path(), "disk.img", MIB);
    let seeds =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/nbd-client-streams");
    let mut inputs: Vec<(String, Vec<u8>)> = std::fs::read_dir(&seeds)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    inputs.push((
        "garbage".into(),
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    ));
    inputs.push(("truncated-greeting-reply".into(), vec![0, 0]));
    for (name, bytes) in inputs {
        let mut child = std::process::Command::new(common::bin())
            .args(["export", "--stdio"])
            .arg(&img)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "{name}: server hung on end of input"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "{name}: exit {status}\n{err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
}

#[test]
fn sigterm_drains_in_flight_writes_and_removes_the_socket() {
    require(&["fio"]);
    let dir = scratch();
    let img = sparse_file(dir.path(), "disk.img", 64 * MIB);
    let e = Export::start(&img, dir.path(), &["--shutdown-grace", "5"]);
    let sock = e.socket.clone();
    let mut fio = std::process::Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={}", e.uri()),
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=16",
            "--size=64M",
            "--time_based",
            "--runtime=30",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let log_before = e.log_text();
    let status = e.stop();
    assert!(
        status.success(),
        "export exits 0 after SIGTERM under load\n{log_before}"
    );
    assert!(!sock.exists(), "socket file removed");
    let _ = fio.kill();
    let _ = fio.wait();
}
