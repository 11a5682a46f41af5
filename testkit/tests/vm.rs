//! The VM harness itself: it boots the kernel with ESP, runs a script with the host's files,
//! reports the script's output and exit status, and kills a run at its timeout.

use std::time::Duration;

use evpc_testkit::vm::{self, Image, VmOptions};

#[test]
fn a_vm_runs_a_script_with_the_hosts_files_and_reports_its_status() {
    if !vm::can_run("a_vm_runs_a_script_with_the_hosts_files_and_reports_its_status") {
        return;
    }
    let image = Image::get().expect("the VM image");
    let manifest = env!("CARGO_MANIFEST_DIR");
    let script = format!(
        "uname -r\n\
         modprobe -a esp4 xfrm_user && grep -q '^esp4 ' /proc/modules && echo esp4-loaded\n\
         head -c 13 {manifest}/Cargo.toml; echo\n\
         touch {manifest}/written-in-the-vm && echo 'written to the overlay'\n\
         exit 7\n"
    );
    let outcome = image.run(&script, &VmOptions::default()).expect("a VM run");
    println!(
        "{:.1} s:\n{}",
        outcome.elapsed.as_secs_f64(),
        outcome.output
    );
    assert_eq!(outcome.status, Some(7), "console:\n{}", outcome.console);
    assert!(
        outcome.output.contains(&image.release),
        "{}",
        outcome.output
    );
    assert!(outcome.output.contains("esp4-loaded"), "{}", outcome.output);
    assert!(outcome.output.contains("[package]"), "{}", outcome.output);
    // the overlay takes the write; the host's file system never sees it
    assert!(
        !std::path::Path::new(manifest)
            .join("written-in-the-vm")
            .exists(),
        "the VM wrote to the host"
    );
}

#[test]
fn a_vm_run_is_killed_at_its_timeout() {
    if !vm::can_run("a_vm_run_is_killed_at_its_timeout") {
        return;
    }
    let image = Image::get().expect("the VM image");
    let options = VmOptions {
        timeout: Duration::from_secs(15),
        ..VmOptions::default()
    };
    let outcome = image.run("sleep 600\n", &options).expect("a VM run");
    assert!(outcome.timed_out);
    assert_eq!(outcome.status, None);
    assert!(outcome.elapsed < Duration::from_secs(30));
}
