-- wrk script for the memory soak: per connection, a pause of SOAK_DELAY_MS before each request, and
-- a mix of 8 small keep-alive GETs, one 64 KiB download (GET /big) and one 64 KiB upload (POST /upload).
local delay_ms = tonumber(os.getenv("SOAK_DELAY_MS") or "20")
local body = string.rep("x", 65536)
local n = 0
local small, big, post

function init(args)
  small = wrk.format("GET", "/")
  big = wrk.format("GET", "/big")
  post = wrk.format("POST", "/upload", {["Content-Type"] = "application/octet-stream"}, body)
end

function delay()
  return delay_ms
end

function request()
  n = n + 1
  local k = n % 10
  if k == 0 then return post end
  if k == 5 then return big end
  return small
end
