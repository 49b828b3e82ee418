// Preloaded into NNI's Node.js manager (NODE_OPTIONS=--require) by search.py: NNI's web UI and REST
// server have no authentication and listen on every interface; this keeps them on 127.0.0.1.
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number' && (args.length === 1 || typeof args[1] === 'function')) {
    args.splice(1, 0, '127.0.0.1');
  }
  return listen.apply(this, args);
};
