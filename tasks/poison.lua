-- Crash accounting of one (ref, variant): KEYS[1] = its attempts hash (field = a message's task
-- id, value = that message's unfinished starts). ARGV[1] = 'start' | 'finish', ARGV[2] = task id,
-- ARGV[3] = ttl ms (start only).
--
-- start: count this start; a normal exit takes it back (finish), a crash leaves it. Returns this
-- start's number and the crashes seen on the ref: ours (n - 1) plus, for other messages, all but
-- the one start that may be running now.
if ARGV[1] == 'start' then
  local n = redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  local crashes = n - 1
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if all[i] ~= ARGV[2] then
      local v = tonumber(all[i + 1])
      if v > 1 then crashes = crashes + v - 1 end
    end
  end
  return {n, crashes}
end
local n = redis.call('HINCRBY', KEYS[1], ARGV[2], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[2]) end
return n
