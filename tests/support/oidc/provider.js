// A real OpenID Provider for gatekeep's integration tests: oidc-provider
// (certified OpenID Connect) on a loopback port, configured from a JSON file.
//
//   node provider.js CONFIG.json
//
// CONFIG: {
//   "port": 41234, "issuer": "http://127.0.0.1:41234"            (issuer optional)
//   "jwks": {"keys": [private JWKs with kid]},                     signing keys
//   "accounts": {"alice": {"groups": ["idp-dev"]}},                people (device flow)
//   "client_accounts": {"agent-alice": "alice"},                   client_credentials clients act as an account
//   "clients": [oidc-provider client metadata],
//   "resources": {"urn:gatekeep": {"scope": "gatekeep", "ttl": 300}},  JWT access token audiences
//   "client_ttl": {"agent-short": 3}                               access token lifetime per client
// }
//
// Access tokens for a resource are JWTs (RFC 9068) carrying preferred_username
// and groups.  The interaction pages are minimal: a login form that takes a
// user name (no password: this is a test provider on loopback), and consent
// granted at once.  When listening it prints one line: "ready ISSUER".
import * as http from 'node:http';
import { readFileSync } from 'node:fs';
import { parse as parseQuery } from 'node:querystring';

import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const port = config.port;
const issuer = config.issuer || `http://127.0.0.1:${port}`;
const accounts = config.accounts || {};
const clientAccounts = config.client_accounts || {};
const resources = config.resources || {};
const clientTtl = config.client_ttl || {};

function accountClaims(name) {
  const account = accounts[name];
  if (!account) return {};
  return { preferred_username: account.preferred_username || name, groups: account.groups || [] };
}

const provider = new Provider(issuer, {
  clients: config.clients || [],
  jwks: config.jwks,
  cookies: { keys: ['gatekeep-test-cookie-key'] },
  claims: { openid: ['sub'], profile: ['preferred_username'], groups: ['groups'] },
  scopes: ['openid', 'offline_access', 'profile', 'groups', 'gatekeep'],
  async findAccount(ctx, id) {
    if (!accounts[id]) return undefined;
    return { accountId: id, async claims() { return { sub: id, ...accountClaims(id) }; } };
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: (ctx, client, oneOf) => oneOf || Object.keys(resources)[0],
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, indicator, client) => {
        const resource = resources[indicator];
        if (!resource) throw new Provider.errors.InvalidTarget();
        return {
          scope: resource.scope || 'gatekeep',
          audience: indicator,
          accessTokenFormat: 'jwt',
          accessTokenTTL: clientTtl[client.clientId] || resource.ttl || 300,
        };
      },
    },
  },
  async extraTokenClaims(ctx, token) {
    const name = token.accountId || clientAccounts[token.clientId];
    return name ? accountClaims(name) : undefined;
  },
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  ttl: {
    AccessToken: (ctx, token, client) => clientTtl[client && client.clientId] || 300,
    DeviceCode: 600,
    RefreshToken: 3600,
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
    IdToken: 300,
  },
});

function readBody(req) {
  return new Promise((resolve, reject) => {
    let data = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => { data += chunk; if (data.length > 65536) reject(new Error('body too large')); });
    req.on('end', () => resolve(parseQuery(data)));
    req.on('error', reject);
  });
}

function escape(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

async function grantConsent(details, session, params) {
  const { prompt: { details: missing }, grantId } = details;
  const grant = grantId ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  if (missing.missingResourceScopes) {
    for (const [indicator, scope] of Object.entries(missing.missingResourceScopes)) {
      grant.addResourceScope(indicator, scope.join(' '));
    }
  }
  return grant.save();
}

// the interaction pages: GET shows the login form (or grants consent at once), POST logs in
provider.use(async (ctx, next) => {
  const match = /^\/interaction\/([^/]+)$/.exec(ctx.path);
  if (!match) return next();
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  const { uid, prompt, params, session } = details;
  if (prompt.name === 'consent') {
    const grantId = await grantConsent(details, session, params);
    await provider.interactionFinished(ctx.req, ctx.res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    ctx.respond = false;
    return undefined;
  }
  if (ctx.method === 'POST') {
    const body = await readBody(ctx.req);
    if (!accounts[body.login]) {
      ctx.status = 400;
      ctx.body = 'unknown account';
      return undefined;
    }
    await provider.interactionFinished(ctx.req, ctx.res, { login: { accountId: body.login } },
      { mergeWithLastSubmission: false });
    ctx.respond = false;
    return undefined;
  }
  ctx.type = 'html';
  ctx.body = `<!DOCTYPE html><html><body><h1>Sign-in</h1>
<form id="login" method="post" action="/interaction/${escape(uid)}">
<input type="text" name="login" placeholder="user name"><button type="submit">Sign in</button>
</form></body></html>`;
  return undefined;
});

const server = http.createServer(provider.callback());
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`ready ${issuer}\n`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => { server.close(); process.exit(0); });
}
