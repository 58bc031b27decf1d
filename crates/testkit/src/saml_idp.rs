//! A real SAML 2.0 IdP for tests: Debian's SimpleSAMLphp served by `php -S`, with its own
//! config directory (`SIMPLESAMLPHP_CONFIG_DIR`), a fresh RSA signing key, and
//! `exampleauth:UserPass` users whose `uid` and `groups` attributes it releases.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::{command_in, free_port};

const WWW: &str = "/usr/share/simplesamlphp/www";
const PHP: &str = "/usr/bin/php";

/// A user the IdP knows.
#[derive(Clone, Debug)]
pub struct IdpUser {
    pub name: String,
    pub password: String,
    pub groups: Vec<String>,
    /// The `AuthnContextClassRef` this user's sign-ons state (e.g. an MFA one); `None`:
    /// SimpleSAMLphp's own (password).
    pub authn_context: Option<String>,
}

/// The service provider the IdP trusts.
#[derive(Clone, Debug)]
pub struct SpEntry {
    pub entity_id: String,
    pub acs_url: String,
}

/// How the IdP signs and how long its assertions last.
#[derive(Clone, Debug)]
pub struct IdpOptions {
    pub assertion_lifetime: Duration,
    /// An XML-DSig signature method URI.
    pub signature_algorithm: String,
}

impl Default for IdpOptions {
    fn default() -> Self {
        IdpOptions {
            assertion_lifetime: Duration::from_secs(300),
            signature_algorithm: "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256".into(),
        }
    }
}

pub struct SamlIdp {
    dir: tempfile::TempDir,
    pub port: u16,
    netns: Option<String>,
    child: Option<Child>,
}

impl std::fmt::Debug for SamlIdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SamlIdp")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

fn php_str(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

impl SamlIdp {
    /// Whether SimpleSAMLphp and php-cli are installed.
    pub fn available() -> bool {
        Path::new(WWW).exists() && Path::new(PHP).exists()
    }

    /// Starts the IdP on a free port (in `netns` when given) and waits until its metadata
    /// is served; it trusts the `sps`.
    pub fn start(
        netns: Option<&str>,
        sps: &[SpEntry],
        users: &[IdpUser],
        options: &IdpOptions,
    ) -> anyhow::Result<SamlIdp> {
        if !Self::available() {
            bail!("{WWW} or {PHP} is missing: run scripts/install-deps.sh");
        }
        let dir = tempfile::Builder::new()
            .prefix("portcullis-samlidp-")
            .tempdir()?;
        let port = free_port()?;
        let d = dir.path();
        for sub in [
            "config", "metadata", "cert", "data", "tmp", "log", "sessions",
        ] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        generate_key(&d.join("cert"), "idp")?;
        let p = |sub: &str| php_str(&format!("{}/{sub}/", d.display()));
        std::fs::write(
            d.join("config/config.php"),
            format!(
                "<?php\n$config = [\n\
                 'baseurlpath' => 'http://127.0.0.1:{port}/',\n\
                 'certdir' => {cert},\n'loggingdir' => {log},\n'datadir' => {data},\n\
                 'tempdir' => {tmp},\n'metadatadir' => {metadata},\n\
                 'secretsalt' => 'portcullis-test-salt-{port}',\n\
                 'auth.adminpassword' => 'not-used-{port}',\n\
                 'technicalcontact_name' => 'tests',\n'technicalcontact_email' => 'tests@example.org',\n\
                 'timezone' => 'UTC',\n'enable.saml20-idp' => true,\n\
                 'module.enable' => ['exampleauth' => true, 'core' => true, 'saml' => true],\n\
                 'store.type' => 'phpsession',\n'session.phpsession.savepath' => {sessions},\n\
                 'session.cookie.secure' => false,\n\
                 'logging.handler' => 'file',\n'logging.logfile' => 'simplesamlphp.log',\n\
                 'logging.level' => SimpleSAML\\Logger::DEBUG,\n\
                 'language.default' => 'en',\n'theme.use' => 'default',\n\
                 'admin.protectindexpage' => false,\n'admin.protectmetadata' => false,\n\
                 ];\n",
                cert = p("cert"),
                log = p("log"),
                data = p("data"),
                tmp = p("tmp"),
                metadata = p("metadata"),
                sessions = p("sessions"),
            ),
        )?;
        let user_lines: String = users
            .iter()
            .map(|u| {
                let groups: Vec<String> = u.groups.iter().map(|g| php_str(g)).collect();
                // `acr` is moved into the sign-on's AuthnContextClassRef (authproc below).
                let acr = u
                    .authn_context
                    .as_deref()
                    .map(|a| format!(", 'acr' => [{}]", php_str(a)))
                    .unwrap_or_default();
                format!(
                    "    {} => ['uid' => [{}], 'groups' => [{}]{acr}],\n",
                    php_str(&format!("{}:{}", u.name, u.password)),
                    php_str(&u.name),
                    groups.join(", ")
                )
            })
            .collect();
        std::fs::write(
            d.join("config/authsources.php"),
            format!(
                "<?php\n$config = [\n  'admin' => ['core:AdminPassword'],\n  'users' => ['exampleauth:UserPass',\n{user_lines}  ],\n];\n"
            ),
        )?;
        std::fs::write(
            d.join("metadata/saml20-idp-hosted.php"),
            format!(
                "<?php\n$metadata['__DYNAMIC:1__'] = [\n\
                 'host' => '__DEFAULT__',\n\
                 'privatekey' => 'idp.key',\n'certificate' => 'idp.crt',\n\
                 'auth' => 'users',\n\
                 'signature.algorithm' => {algorithm},\n\
                 'saml20.sign.response' => true,\n'saml20.sign.assertion' => true,\n\
                 'assertion.lifetime' => {lifetime},\n\
                 'attributes.NameFormat' => 'urn:oasis:names:tc:SAML:2.0:attrname-format:basic',\n\
                 'authproc' => [10 => ['class' => 'core:PHP', 'code' => 'if (isset($attributes[\"acr\"])) {{ $state[\"saml:AuthnContextClassRef\"] = $attributes[\"acr\"][0]; unset($attributes[\"acr\"]); }}']],\n\
                 ];\n",
                lifetime = options.assertion_lifetime.as_secs().max(1),
                algorithm = php_str(&options.signature_algorithm),
            ),
        )?;
        let sp_lines: String = sps
            .iter()
            .map(|sp| {
                format!(
                    "$metadata[{}] = [\n\
                     'AssertionConsumerService' => [['Binding' => 'urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST', 'Location' => {}]],\n\
                     'NameIDFormat' => 'urn:oasis:names:tc:SAML:2.0:nameid-format:transient',\n\
                     ];\n",
                    php_str(&sp.entity_id),
                    php_str(&sp.acs_url),
                )
            })
            .collect();
        std::fs::write(
            d.join("metadata/saml20-sp-remote.php"),
            format!("<?php\n{sp_lines}"),
        )?;
        let mut idp = SamlIdp {
            dir,
            port,
            netns: netns.map(str::to_string),
            child: None,
        };
        idp.launch()?;
        Ok(idp)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The IdP's entity id, which is also its metadata URL.
    pub fn metadata_url(&self) -> String {
        format!("{}/saml2/idp/metadata.php", self.url())
    }

    /// The IdP's signing key and certificate (PEM), to forge responses in tests.
    pub fn signing_key(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("cert/idp.key"),
            self.dir.path().join("cert/idp.crt"),
        )
    }

    /// The metadata document, fetched from the running IdP.
    pub fn metadata(&self) -> anyhow::Result<String> {
        let mut cmd = command_in(self.netns.as_deref(), "curl");
        let out = cmd
            .args(["-s", "--max-time", "5", &self.metadata_url()])
            .output()
            .context("running curl")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The IdP's log, for failure messages.
    pub fn log(&self) -> String {
        let d = self.dir.path();
        format!(
            "{}{}",
            std::fs::read_to_string(d.join("log/simplesamlphp.log")).unwrap_or_default(),
            std::fs::read_to_string(d.join("stderr.log")).unwrap_or_default()
        )
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let mut cmd = command_in(self.netns.as_deref(), PHP);
        let child = cmd
            .args(["-S", &format!("127.0.0.1:{}", self.port), "-t", WWW])
            .env("SIMPLESAMLPHP_CONFIG_DIR", d.join("config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(d.join("stderr.log"))?))
            .spawn()
            .context("starting php -S")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            // Error pages answer 200 too: ready is when the metadata is there.
            if self.metadata()?.contains("EntityDescriptor") {
                return Ok(());
            }
            if let Some(c) = &mut self.child {
                if let Some(status) = c.try_wait()? {
                    bail!("php -S exited ({status}): {}", self.log());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "SimpleSAMLphp served no metadata within 15 s: {}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SamlIdp {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An RSA-2048 key and a self-signed certificate, `<name>.key` and `<name>.crt` in `dir`.
pub fn generate_key(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let key = dir.join(format!("{name}.key"));
    let crt = dir.join(format!("{name}.crt"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", &format!("/CN={name}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .context("running openssl (apt install openssl)")?;
    if !out.status.success() {
        bail!("openssl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((key, crt))
}
