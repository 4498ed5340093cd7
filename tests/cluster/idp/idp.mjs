// The box's identity provider: oidc-provider issuing JWT access tokens to service
// clients (client_credentials, RFC 8707 resource indicators), the way a hospital's
// IdP serves a LIS. Settings from the environment: ISSUER, PORT, AUDIENCE,
// ROLES_CLAIM and CLIENTS (JSON: {client_id: {secret, roles: [...]}}).
import { generateKeyPair, exportJWK } from 'jose';
import Provider from 'oidc-provider';

const { ISSUER, PORT, AUDIENCE, ROLES_CLAIM, CLIENTS } = process.env;
const clients = JSON.parse(CLIENTS);
const RESOURCE = 'urn:smily:api';

const { privateKey } = await generateKeyPair('RS256', { extractable: true });
const jwk = { ...(await exportJWK(privateKey)), kid: 'box-rs256', alg: 'RS256', use: 'sig' };

const provider = new Provider(ISSUER, {
  clients: Object.entries(clients).map(([id, c]) => ({
    client_id: id,
    client_secret: c.secret,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
  })),
  jwks: { keys: [jwk] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => RESOURCE,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: '',
        audience: AUDIENCE,
        accessTokenTTL: 600,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  extraTokenClaims: (ctx, token) => ({ [ROLES_CLAIM]: clients[token.clientId]?.roles ?? [] }),
});
provider.listen(Number(PORT), () => console.log(`idp listening on ${PORT} as ${ISSUER}`));
