// Drives Debian's Chromium through the console as a person would, for the end-to-end
// tests: signs in through the real IdP, then one scenario. Prints one JSON object.
//
// Usage: node console.mjs BASE USER PASSWORD SCENARIO [ARGS...]
//   auditor AT            search bob's denied flows, export CSV, look for edit controls,
//                         forge a POST to an admin action; explain alice → prod-admin at AT
//   disable NAME          open NAME's page from the user search and disable them
//   link URL              (no IdP sign-in) open a break-glass link, use it, use it again
//   policy FILE BAD GOOD  edit FILE: BAD shows its errors in place, GOOD its tests and
//                         diff, then apply; a second editor opened before then applies
//                         over the stale version
//
// Chromium runs headless with the flags this machine needs (no background networking:
// its connections are refused here) and a new profile directory.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const [base, user, password, scenario, ...args] = process.argv.slice(2);
// With PORTCULLIS_SCREENSHOTS=DIR, the pages are also saved there (the README's).
const shots = process.env.PORTCULLIS_SCREENSHOTS;
async function shot(page, name) {
  if (shots) await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
}
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'pcl-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  acceptDownloads: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const out = {};
try {
  const page = context.pages()[0] ?? await context.newPage();
  page.setDefaultTimeout(15000);
  // Anything the content security policy blocked, or a script error, shows here (not
  // the refusals the tests ask for: those are HTTP statuses).
  out.console_errors = [];
  page.on('console', m => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) out.console_errors.push(m.text());
  });
  page.on('pageerror', e => out.console_errors.push(String(e)));
  // Every page loaded: each visible form control must have a label (or an aria-label).
  out.unlabeled = [];
  out.pages_checked = 0;
  page.on('load', async () => {
    try {
      out.pages_checked += 1;
      const missing = await page.$$eval('input:not([type=hidden]), select, textarea', els => els
        .filter(e => !(e.id && document.querySelector(`label[for="${e.id}"]`)) && !e.getAttribute('aria-label'))
        .map(e => e.name || e.id || e.outerHTML.slice(0, 60)));
      for (const m of missing) out.unlabeled.push(`${page.url()}: ${m}`);
    } catch (e) { /* the page navigated on */ }
  });
  if (scenario === 'link') await link(page, out, args[0]);
  else await signIn(page, out);
  if (scenario === 'link') { /* done */ }
  else if (scenario === 'auditor') await auditor(page, out, args[0]);
  else if (scenario === 'disable') await disable(page, out, args[0]);
  else if (scenario === 'policy') await policy(page, out, ...args);
  else throw new Error(`no scenario ${scenario}`);
} catch (e) {
  out.error = String(e && e.stack || e);
} finally {
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(out));

// Keyboard only: the console's sign-in link, then the IdP's form.
async function signIn(page, out) {
  const first = await page.goto(`${base}/console`);
  out.unsigned_status = first.status();
  await page.keyboard.press('Tab'); // the skip link
  await page.keyboard.press('Tab'); // "Sign in"
  out.focused = await page.evaluate(() => document.activeElement && document.activeElement.id);
  await Promise.all([page.waitForURL(/simplesaml|module\.php/), page.keyboard.press('Enter')]);
  await page.locator('input[name=username]').focus();
  await page.keyboard.type(user);
  await page.locator('input[name=password]').focus();
  await page.keyboard.type(password);
  await Promise.all([page.waitForURL(`${base}/console`), page.keyboard.press('Enter')]);
  out.whoami = await page.textContent('#whoami');
  await shot(page, `overview-${user}`);
}

async function auditor(page, out, at) {
  // The overview's numbers refresh from its script (allowed by the CSP: 'self').
  await page.waitForSelector('body[data-refreshed]');
  out.live = await page.$$eval('[data-live]', els => Object.fromEntries(els.map(e => [e.dataset.live, e.textContent])));
  await page.goto(`${base}/console/audit`);
  await page.fill('#f-user', 'bob');
  await page.fill('#f-decision', 'deny');
  await Promise.all([page.waitForURL(/audit\?/), page.click('#search')]);
  out.rows = Number(await page.textContent('#row-count'));
  out.table = await page.$$eval('#results tbody tr', trs => trs.map(tr => [...tr.cells].map(td => td.textContent)));
  await shot(page, 'audit');
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#csv')]);
  out.csv = fs.readFileSync(await download.path(), 'utf8');
  out.post_forms = await page.locator('form[method=post]').count();
  await page.selectOption('#f-report', 'denied');
  await Promise.all([page.waitForNavigation(), page.click('#search')]);
  out.report_columns = await page.$$eval('#results thead th', ths => ths.map(th => th.textContent));
  out.report_rows = Number(await page.textContent('#row-count'));
  await Promise.all([page.waitForURL(/verify$/), page.click('#verify')]);
  out.verdict = await page.textContent('#verdict');
  out.nav = await page.$$eval('nav a', as => as.map(a => a.textContent));
  out.users_status = (await page.goto(`${base}/console/users`)).status();
  out.users_forms = await page.locator('form[method=post]').count();
  await page.goto(`${base}/console/policies`);
  out.policy_files = await page.locator('main h2[id^=file-]').count();
  out.policy_edit_links = await page.locator('a[href*="/console/policies/edit"]').count();
  out.editor_status = (await page.goto(`${base}/console/policies/edit?file=access.cedar`)).status();
  await page.goto(`${base}/console`);
  const csrf = await page.getAttribute('meta[name=csrf-token]', 'content');
  // The real token: only the role check stands between an auditor and the action.
  const forged = await page.request.post(`${base}/console/users/bob/disable`, {
    form: { csrf, confirm: 'yes' }, maxRedirects: 0,
  });
  out.forged_status = forged.status();
  const stale = await page.request.post(`${base}/console/users/bob/disable`, {
    form: { csrf: 'not-the-token', confirm: 'yes' }, maxRedirects: 0,
  });
  out.stale_status = stale.status();
  const headers = (await page.request.get(`${base}/console`)).headers();
  out.csp = headers['content-security-policy'];

  await page.goto(`${base}/console`);
  await Promise.all([page.waitForURL(/explain$/), page.click('nav a:text-is("Explain")')]);
  await page.fill('#x-user', 'alice');
  await page.fill('#x-dst', '10.8.100.5:22/tcp');
  await page.fill('#x-at', at);
  await page.fill('#x-auth-age', '60');
  await Promise.all([page.waitForURL(/explain\?/), page.click('#explain')]);
  await shot(page, 'explain');
  out.explain = {
    decision: await page.textContent('#decision'),
    reason: await page.textContent('#reason'),
    network: await page.textContent('#network'),
    depends_on: await page.textContent('#depends-on'),
    policies: await page.$$eval('#policies li', lis => lis.map(li => li.textContent)),
    links: await page.$$eval('#policies li a', as => as.map(a => a.getAttribute('href'))),
  };
}

async function disable(page, out, name) {
  // IT's sessions and devices page: rotate a registered device (its new profile shown
  // once, with a QR code), then remove it.
  await page.goto(`${base}/console`);
  await Promise.all([page.waitForURL(/devices$/), page.click('nav a:text-is("Sessions and devices")')]);
  out.sessions_listed = await page.locator('#all-sessions tbody tr').count();
  out.devices_listed = await page.locator('#all-devices tbody tr').count();
  await Promise.all([page.waitForNavigation(), page.click('#all-devices tbody tr:first-child button:text-is("Rotate")')]);
  out.rotated = await page.textContent('#result');
  out.profile = await page.inputValue('#profile');
  out.qr = await page.locator('#qr svg').count();
  await shot(page, 'rotated');
  await page.goto(`${base}/console/devices`);
  out.devices_after_rotate = await page.locator('#all-devices tbody tr').count();
  await Promise.all([page.waitForNavigation(), page.click('#all-devices tbody tr:first-child button:text-is("Remove")')]);
  out.removed = await page.textContent('#result');
  await page.goto(`${base}/console/users`);
  await page.fill('#q', name);
  await Promise.all([page.waitForURL(/users\?q=/), page.keyboard.press('Enter')]);
  await Promise.all([page.waitForURL(new RegExp(`/console/users/${name}$`)), page.click(`#users a:text-is("${name}")`)]);
  out.state_before = await page.textContent('#state');
  out.sessions_before = await page.locator('#sessions tbody tr').count();
  await shot(page, 'user');
  // Keyboard only: Tab to the confirmation, Space ticks it, Tab to the button, Enter.
  out.tabs_to_confirm = await tabTo(page, 'confirm');
  await page.keyboard.press('Space');
  out.tabs_to_disable = await tabTo(page, 'disable-now');
  await Promise.all([page.waitForURL(/disable$/), page.keyboard.press('Enter')]);
  out.result = await page.textContent('#result');
  await shot(page, 'disabled');
  // The user's page, with their newest flows and denies once the trail has them.
  for (let i = 0; i < 20; i++) {
    await page.goto(`${base}/console/users/${name}`);
    out.recent = await page.$$eval('#recent tbody tr', trs => trs.map(tr => [...tr.cells].map(td => td.textContent)));
    if (out.recent.length > 0) break;
    await page.waitForTimeout(500);
  }
  out.state_after = await page.textContent('#state');
  // The overview lists the revocation once the trail has it (uploads every 200 ms).
  for (let i = 0; i < 20; i++) {
    await page.goto(`${base}/console`);
    out.revocations = await page.$$eval('#revocations tbody tr', trs => trs.map(tr => [...tr.cells].map(td => td.textContent)));
    if (out.revocations.some(r => r[1] === name)) break;
    await page.waitForTimeout(500);
  }
  out.sources = await page.textContent('#sources');
}

async function policy(page, out, file, bad, good) {
  await page.goto(`${base}/console/policies`);
  out.running = await page.locator('#running tbody tr').count();
  await Promise.all([page.waitForURL(/edit\?file=/), page.click(`a:text-is("Edit ${file}")`)]);
  out.version_before = await page.inputValue('input[name=version]');
  // A second editor opens the same file now, and applies later.
  const other = await page.context().newPage();
  await other.goto(page.url());
  await page.fill('#text', bad);
  await Promise.all([page.waitForNavigation(), page.click('#check')]);
  out.problems = await page.$$eval('#problems li', lis => lis.map(li => li.textContent));
  out.bad_lines = await page.$$eval('.ln.bad', ls => ls.map(l => l.id));
  await shot(page, 'policy-error');
  await page.fill('#text', good);
  await Promise.all([page.waitForNavigation(), page.click('#check')]);
  out.check_note = await page.textContent('#note');
  out.diff_added = await page.$$eval('#diff .add', ls => ls.map(l => l.textContent));
  out.diff_removed = await page.$$eval('#diff .del', ls => ls.map(l => l.textContent));
  out.tests = await page.$$eval('#tests li', lis => lis.map(li => li.textContent));
  await shot(page, 'policy-check');
  await Promise.all([page.waitForNavigation(), page.click('#apply')]);
  out.apply_note = await page.textContent('#note');
  await other.fill('#text', good + '\n// a second editor\n');
  await Promise.all([other.waitForNavigation(), other.click('#apply')]);
  out.stale_note = await other.textContent('#note');
  // The history names who replaced the set (from the audit trail, uploaded every 200 ms).
  for (let i = 0; i < 20; i++) {
    await page.goto(`${base}/console/policies`);
    out.history = await page.$$eval('#history tbody tr', trs => trs.map(tr => [...tr.cells].map(td => td.textContent)));
    if (out.history.length >= 2) break;
    await page.waitForTimeout(500);
  }
}

async function link(page, out, url) {
  await page.goto(url);
  await Promise.all([page.waitForURL(`${base}/console`), page.click('#use-link')]);
  out.whoami = await page.textContent('#whoami');
  // The same link again, in a fresh page: refused.
  const again = await page.context().newPage();
  await again.goto(url);
  const [response] = await Promise.all([again.waitForNavigation(), again.click('#use-link')]);
  out.again_status = response.status();
}

// Presses Tab until the element with `id` has the focus; how many presses it took
// (-1: never, within 60).
async function tabTo(page, id) {
  for (let i = 1; i <= 60; i++) {
    await page.keyboard.press('Tab');
    if (await page.evaluate(() => document.activeElement && document.activeElement.id) === id) return i;
  }
  return -1;
}
