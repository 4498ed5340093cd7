// The viewer's login IdP for the browser test (tests/test_viewer_login.py): oidc-provider's own
// login and consent pages, one public client (authorization code with PKCE, no secret)
// redirecting to the viewer, and JWT access tokens for the gateway naming the account's roles
// and tenant. Settings from the environment: ISSUER, PORT, AUDIENCE, CLIENT_ID, REDIRECT_URI,
// ROLES_CLAIM, TENANT_CLAIM and ACCOUNTS (JSON: {login: {tenant, roles: [...]}}).
import { generateKeyPair, exportJWK } from 'jose';
import Provider from 'oidc-provider';

const { ISSUER, PORT, AUDIENCE, CLIENT_ID, REDIRECT_URI, ROLES_CLAIM, TENANT_CLAIM, ACCOUNTS } = process.env;
const accounts = JSON.parse(ACCOUNTS);
const RESOURCE = 'urn:smily:api';
const viewer = new URL(REDIRECT_URI).origin;

const { privateKey } = await generateKeyPair('RS256', { extractable: true });
const jwk = { ...(await exportJWK(privateKey)), kid: 'login-rs256', alg: 'RS256', use: 'sig' };

const provider = new Provider(ISSUER, {
  clients: [{
    client_id: CLIENT_ID,
    token_endpoint_auth_method: 'none', // a public client: the page holds no secret, PKCE binds the code
    grant_types: ['authorization_code'],
    response_types: ['code'],
    redirect_uris: [REDIRECT_URI],
  }],
  jwks: { keys: [jwk] },
  pkce: { required: () => true },
  // Only the accounts named; the login page's password is not checked (a test IdP).
  findAccount: (ctx, id) => (accounts[id] ? { accountId: id, claims: () => ({ sub: id, name: id }) } : undefined),
  claims: { openid: ['sub'], profile: ['name'] },
  // The page calls discovery and the token endpoint from the viewer's origin.
  clientBasedCORS: (ctx, origin) => origin === viewer,
  features: {
    devInteractions: { enabled: true }, // oidc-provider's login and consent pages
    resourceIndicators: {
      enabled: true,
      defaultResource: () => RESOURCE,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'smily',
        audience: AUDIENCE,
        accessTokenTTL: 600,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  extraTokenClaims: (ctx, token) => {
    const account = accounts[token.accountId];
    return account ? { [ROLES_CLAIM]: account.roles, [TENANT_CLAIM]: account.tenant } : {};
  },
});
provider.listen(Number(PORT), () => console.log(`login idp listening on ${PORT} as ${ISSUER}`));
