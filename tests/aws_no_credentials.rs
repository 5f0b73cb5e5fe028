//! Credentials and region missing: a separate test binary, so its environment holds neither.
//! Never talks to AWS: the endpoint is a closed loopback port, IMDS is disabled.

use twinvol::cloud::aws::AwsCloud;
use twinvol::config::cloud::CloudConfig;

fn config(region: Option<&str>) -> CloudConfig {
    let region = region
        .map(|r| format!("region = \"{r}\"\n"))
        .unwrap_or_default();
    let text = format!(
        "provider = \"aws\"\n[aws]\n{region}step_timeout_s = 5\nactivation_timeout_s = 5\n[aws.endpoints]\nec2 = \"http://127.0.0.1:9\"\nroute53 = \"http://127.0.0.1:9\"\n[node]\ninstance_id = \"i-0123456789abcdef0\"\nnetwork_interface = \"eni-0123456789abcdef0\"\n[eip]\nallocation_id = \"eipalloc-0123456789abcdef0\"\n"
    );
    let c: CloudConfig = toml::from_str(&text).unwrap();
    c.validate().unwrap();
    c
}

fn clean_env() {
    for v in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ] {
        std::env::remove_var(v);
    }
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    std::env::set_var("AWS_CONFIG_FILE", "/nonexistent/twinvol-test-aws-config");
    std::env::set_var(
        "AWS_SHARED_CREDENTIALS_FILE",
        "/nonexistent/twinvol-test-aws-credentials",
    );
}

#[tokio::test]
async fn missing_region_and_missing_credentials_are_named() {
    clean_env();
    let e = AwsCloud::connect(&config(None))
        .await
        .err()
        .expect("no region")
        .to_string();
    assert!(e.starts_with("no AWS region is configured"), "{e}");
    assert!(e.contains("cloud.aws.region"), "{e}");

    let e = AwsCloud::connect(&config(Some("eu-west-1")))
        .await
        .err()
        .expect("no credentials")
        .to_string();
    assert!(e.starts_with("AWS credentials are missing or wrong"), "{e}");
    assert!(e.contains("instance profile"), "{e}");
}
