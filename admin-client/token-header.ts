/** The admin client's side of the admin token: it rides on every call as a bearer token. */
import type { Interceptor } from "@connectrpc/connect";

/** Client interceptor: sends the admin token with every call. */
export function adminTokenHeaderInterceptor(token: string): Interceptor {
  return (next) => async (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return await next(req);
  };
}
