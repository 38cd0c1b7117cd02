// Added to the guide's examples: the page comes with a browser session cookie (lib/session.ts).
import { NextRequest, NextResponse } from "next/server";
import { ensureSession } from "./lib/session";

export function proxy(req: NextRequest) {
  return ensureSession(req, NextResponse.next());
}

export const config = { matcher: "/" };
