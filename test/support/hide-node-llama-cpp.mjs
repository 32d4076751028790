// Loaded with `node --import`: makes `node-llama-cpp` unresolvable in that process, as on a machine
// where the optional dependency was not installed (npm i --omit=optional), to test what a control
// plane without it does.
import { register } from "node:module";

const hook = `
export async function resolve(specifier, context, next) {
  if (specifier === "node-llama-cpp" || specifier.startsWith("node-llama-cpp/")) {
    const error = new Error("Cannot find package 'node-llama-cpp' imported from " + context.parentURL);
    error.code = "ERR_MODULE_NOT_FOUND";
    throw error;
  }
  return next(specifier, context);
}`;
register(`data:text/javascript,${encodeURIComponent(hook)}`);
