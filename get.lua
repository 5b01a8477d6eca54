math.randomseed(os.time())
request = function()
  return wrk.format("GET", string.format("/v1/tables/hits/entries/k%015d", math.random(0, 9999)), nil, nil)
end
